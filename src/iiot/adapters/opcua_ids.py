"""Node ids of the platform namespace: stable across renames and restarts, owner readable.

`tenant:{tenant id}`, `device:{device id}` (the device object), `device:{id}:Status`,
`device:{id}:SetStatus` (+ `:InputArguments`) and `device:{id}:telemetry:{key}`.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from asyncua import ua as _ua

__all__ = [
    "TENANTS_FOLDER",
    "args_node",
    "connected_node",
    "device_node",
    "last_seen_node",
    "method_node",
    "parse_telemetry_node",
    "status_node",
    "telemetry_node",
    "tenant_node",
]

# asyncua's `ua` types are generated NewTypes that mypy cannot follow; treat them as Any.
ua: Any = _ua

TENANTS_FOLDER = "Tenants"
_TELEMETRY = ":telemetry:"
_UUID_LEN = 36


def tenant_node(ns: int, tenant_id: UUID) -> ua.NodeId:
    """The folder of a tenant."""
    return ua.NodeId(f"tenant:{tenant_id}", ns)


def device_node(ns: int, device_id: UUID) -> ua.NodeId:
    """The object of a device."""
    return ua.NodeId(f"device:{device_id}", ns)


def status_node(ns: int, device_id: UUID) -> ua.NodeId:
    """A device's `Status` variable."""
    return ua.NodeId(f"device:{device_id}:Status", ns)


def connected_node(ns: int, device_id: UUID) -> ua.NodeId:
    """A device's `Connected` variable."""
    return ua.NodeId(f"device:{device_id}:Connected", ns)


def last_seen_node(ns: int, device_id: UUID) -> ua.NodeId:
    """A device's `LastSeen` variable."""
    return ua.NodeId(f"device:{device_id}:LastSeen", ns)


def method_node(ns: int, device_id: UUID) -> ua.NodeId:
    """A device's `SetStatus` method."""
    return ua.NodeId(f"device:{device_id}:SetStatus", ns)


def args_node(ns: int, device_id: UUID) -> ua.NodeId:
    """The `InputArguments` property of a device's `SetStatus` method."""
    return ua.NodeId(f"device:{device_id}:SetStatus:InputArguments", ns)


def telemetry_node(ns: int, device_id: UUID, key: str) -> ua.NodeId:
    """The variable holding a device's latest value of one telemetry key."""
    return ua.NodeId(f"device:{device_id}{_TELEMETRY}{key}", ns)


def parse_telemetry_node(ns: int, nodeid: ua.NodeId) -> tuple[UUID, str] | None:
    """(device id, key) of a telemetry variable's node id; None for any other node."""
    ident = nodeid.Identifier
    if nodeid.NamespaceIndex != ns or not isinstance(ident, str) or not ident.startswith("device:"):
        return None
    rest = ident[7 + _UUID_LEN :]
    if not rest.startswith(_TELEMETRY):
        return None
    try:
        device_id = UUID(ident[7 : 7 + _UUID_LEN])
    except ValueError:
        return None
    key = rest[len(_TELEMETRY) :]
    return (device_id, key) if key else None
