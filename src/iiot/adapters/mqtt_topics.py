"""The topics a device may use on the platform's MQTT endpoint, as small tables.

Three families: ours (`devices/{id}/...`), ThingsBoard's device API (`v1/devices/me/...`)
and ThingsBoard's gateway API (`v1/gateway/...`, gateways only). `route` names what a
published topic means; `may_subscribe` says whether a topic filter is one the device may
listen on. Anything not in these tables is refused by the connection.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "OURS",
    "TB",
    "Route",
    "may_subscribe",
    "route",
    "topic_matches",
]

OURS, TB, GATEWAY = "ours", "tb", "gateway"

# What a publish means: the action, and the last topic level when it names a request.
TELEMETRY = "telemetry"
ATTRIBUTES = "attributes"
ATTRIBUTE_REQUEST = "attribute_request"
COMMAND_REPLY = "command_reply"
CLIENT_RPC = "client_rpc"
GW_CONNECT = "gw_connect"
GW_DISCONNECT = "gw_disconnect"
GW_TELEMETRY = "gw_telemetry"
GW_ATTRIBUTES = "gw_attributes"
GW_ATTRIBUTE_REQUEST = "gw_attribute_request"
GW_RPC = "gw_rpc"


@dataclass(frozen=True, slots=True)
class Route:
    """What a published topic asks for."""

    action: str
    family: str
    arg: str = ""  # the request id or command id named by the topic


# Exact topics after the family prefix -> action.
_OURS_EXACT = {"telemetry": TELEMETRY, "attributes": ATTRIBUTES}
_TB_EXACT = {"telemetry": TELEMETRY, "attributes": ATTRIBUTES}
_GATEWAY_EXACT = {
    "connect": GW_CONNECT,
    "disconnect": GW_DISCONNECT,
    "telemetry": GW_TELEMETRY,
    "attributes": GW_ATTRIBUTES,
    "attributes/request": GW_ATTRIBUTE_REQUEST,
    "rpc": GW_RPC,
}
# Topics with one variable last level: (prefix, suffix) after the family prefix -> action.
_OURS_PATTERNS = [
    ("attributes/request/", "", ATTRIBUTE_REQUEST),
    ("commands/", "/reply", COMMAND_REPLY),
]
_TB_PATTERNS = [
    ("attributes/request/", "", ATTRIBUTE_REQUEST),
    ("rpc/response/", "", COMMAND_REPLY),
    ("rpc/request/", "", CLIENT_RPC),
]

# Filters a device may subscribe to, after the family prefix.
_OURS_FILTERS = {
    "commands/+",
    "commands/#",
    "attributes/shared",
    "attributes/response/+",
    "#",
}
_TB_FILTERS = {
    "attributes",
    "attributes/response/+",
    "rpc/request/+",
    "rpc/response/+",
}
_GATEWAY_FILTERS = {"rpc", "attributes", "attributes/response"}

TB_PREFIX = "v1/devices/me/"
GATEWAY_PREFIX = "v1/gateway/"


def ours_prefix(device_id: str) -> str:
    """Every topic of our family for this device starts with this."""
    return f"devices/{device_id}/"


def _match(
    rest: str, exact: dict[str, str], patterns: list[tuple[str, str, str]], family: str
) -> Route | None:
    action = exact.get(rest)
    if action is not None:
        return Route(action, family)
    for prefix, suffix, action in patterns:
        if rest.startswith(prefix) and rest.endswith(suffix):
            arg = rest[len(prefix) : len(rest) - len(suffix)]
            if arg and "/" not in arg:
                return Route(action, family, arg)
    return None


def route(device_id: str, is_gateway: bool, topic: str) -> Route | None:
    """What publishing to `topic` means for this device; None: not its topic."""
    own = ours_prefix(device_id)
    if topic.startswith(own):
        return _match(topic[len(own) :], _OURS_EXACT, _OURS_PATTERNS, OURS)
    if topic.startswith(TB_PREFIX):
        return _match(topic[len(TB_PREFIX) :], _TB_EXACT, _TB_PATTERNS, TB)
    if is_gateway and topic.startswith(GATEWAY_PREFIX):
        action = _GATEWAY_EXACT.get(topic[len(GATEWAY_PREFIX) :])
        return Route(action, GATEWAY) if action else None
    return None


def may_subscribe(device_id: str, is_gateway: bool, topic_filter: str) -> bool:
    """Whether the device may listen on this topic filter."""
    own = ours_prefix(device_id)
    if topic_filter.startswith(own):
        rest = topic_filter[len(own) :]
        # Any topic under the device's own prefix, wildcards only at the end of it.
        return rest in _OURS_FILTERS or ("+" not in rest and "#" not in rest and bool(rest))
    if topic_filter.startswith(TB_PREFIX):
        return topic_filter[len(TB_PREFIX) :] in _TB_FILTERS
    if is_gateway and topic_filter.startswith(GATEWAY_PREFIX):
        return topic_filter[len(GATEWAY_PREFIX) :] in _GATEWAY_FILTERS
    return False


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching with `+` and `#`."""
    if topic_filter == topic:
        return True
    parts = topic_filter.split("/")
    levels = topic.split("/")
    for index, part in enumerate(parts):
        if part == "#":
            return True
        if index >= len(levels):
            return False
        if part != "+" and part != levels[index]:
            return False
    return len(parts) == len(levels)
