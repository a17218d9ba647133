"""`ControlInbox`: the platform's `DeviceInbox` (command replies, client attributes,
attribute requests, client-side RPC), handed to every adapter as `services.inbox`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from iiot.control.attributes import AttributeService, check_attributes
from iiot.control.commands import CommandService
from iiot.errors import InvalidPayload
from iiot.links import DeliveryFailed
from iiot.model import Device
from iiot.storage._common import now_ms

__all__ = ["SESSION_LIMITS", "ControlInbox"]

# What ThingsBoard's getSessionLimits answers; ours are the platform's own limits.
SESSION_LIMITS = {
    "maxPayloadSize": 65536,
    "maxInflightMessages": 100,
    "rateLimits": {
        "messages": "200:1,6000:60,14000:3600",
        "telemetryMessages": "100:1,3000:60,7000:3600",
        "telemetryDataPoints": "200:1,6000:60,14000:3600",
    },
}


class ControlInbox:
    """Hands what devices send to the command and attribute services."""

    def __init__(self, commands: CommandService, attributes: AttributeService) -> None:
        """Both services must be running."""
        self._commands = commands
        self._attributes = attributes

    async def command_reply(self, device: Device, command_id: UUID, response: Any) -> None:
        """The device's answer to a two-way command."""
        await self._commands.reply(device, command_id, response)

    async def report_attributes(self, device: Device, values: Mapping[str, Any]) -> None:
        """Client attributes reported by the device."""
        checked = check_attributes(dict(values), InvalidPayload)
        await self._attributes.merge(device.tenant_id, device, "client", checked)

    async def request_attributes(
        self, device: Device, client_keys: Sequence[str] | None, shared_keys: Sequence[str] | None
    ) -> dict[str, dict[str, Any]]:
        """{"client": {...}, "shared": {...}} (plain values; None asks for every key)."""
        answer: dict[str, dict[str, Any]] = {}
        for attr_scope, keys in (("client", client_keys), ("shared", shared_keys)):
            found = await self._attributes.get(device.tenant_id, device.id, (attr_scope,), keys)
            answer[attr_scope] = {k: v.value for k, v in found[attr_scope].items()}
        return answer

    async def client_rpc(self, device: Device, method: str, params: Any) -> Any:
        """Answer `getSessionLimits` and `getTime`; refuse anything else."""
        if method == "getSessionLimits":
            return SESSION_LIMITS
        if method == "getTime":
            return {"time": now_ms()}
        raise DeliveryFailed(
            f"unknown method {method!r}: the platform answers getSessionLimits and getTime"
        )
