"""The way back to devices: who holds each device's connection here, and what devices ask.

Two directions, each a small interface so that services never know protocols and adapters
never hold the rules of commands or attributes:

- `DeviceLinks` (platform -> device): an adapter *attaches* a `DeviceLink` while a device
  listens in this process (an MQTT connection subscribed to its commands or attributes, an
  HTTP long poll, a CoAP observation, an AMQP command queue) and detaches it when that ends.
  The command and attribute services push through the links of a device and learn from the
  link whether the device confirmed receipt.
- `DeviceInbox` (device -> platform): what adapters hand over besides telemetry (command
  replies, client attributes, attribute requests, client-side RPC). The command and
  attribute services implement it; `UnsupportedInbox` answers until they are wired in.

Connectivity (`Device.connected`) follows the links: a device is connected while at least
one of its links is attached in some process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

from iiot.errors import IIoTError
from iiot.model import Device

__all__ = [
    "DeliveryFailed",
    "DeviceInbox",
    "DeviceLink",
    "DeviceLinks",
    "LinkListener",
    "OutboundCommand",
    "UnsupportedInbox",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OutboundCommand:
    """A command on its way to a device: a stable id so the device can drop duplicates."""

    id: UUID
    method: str
    params: Any  # any JSON value
    oneway: bool = False


class DeliveryFailed(IIoTError):
    """The link could not hand the message to the device (closed, refused, no confirmation)."""


class DeviceLink(Protocol):
    """One open way to push messages to one device right now."""

    protocol: str  # "mqtt", "http", "coap", "amqp", "mqtt-external", "opcua"...
    listens_commands: bool  # the device subscribed to / polls for commands on this link
    listens_attributes: bool  # ... and for shared-attribute updates

    async def deliver_command(self, command: OutboundCommand) -> bool:
        """Send a command; True once the device confirmed receipt, False when the protocol
        cannot prove it (an external broker). Raises `DeliveryFailed`."""
        ...

    async def deliver_attributes(self, shared: Mapping[str, Any], deleted: Sequence[str]) -> None:
        """Send changed (and deleted) shared attributes. Raises `DeliveryFailed`."""
        ...


# Called with (device, link, attached) whenever a link is attached or detached.
LinkListener = Callable[[Device, DeviceLink, bool], None]


class DeviceLinks:
    """The links attached in this process, by device id."""

    def __init__(self) -> None:
        self._links: dict[UUID, list[DeviceLink]] = {}
        self._devices: dict[UUID, Device] = {}
        self._listeners: list[LinkListener] = []

    def add_listener(self, listener: LinkListener) -> None:
        """Be told of every attach and detach (commands flush their queue on attach)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: LinkListener) -> None:
        """Stop telling this listener."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def attach(self, device: Device, link: DeviceLink) -> None:
        """A device now listens on this link (call again after a subscription changes)."""
        links = self._links.setdefault(device.id, [])
        if link not in links:
            links.append(link)
        self._devices[device.id] = device
        self._tell(device, link, True)

    def detach(self, device_id: UUID, link: DeviceLink) -> None:
        """The link closed (connection lost, poll answered or timed out, observation ended)."""
        links = self._links.get(device_id)
        if not links or link not in links:
            return
        links.remove(link)
        device = self._devices[device_id]
        if not links:
            del self._links[device_id]
            del self._devices[device_id]
        self._tell(device, link, False)

    def links(self, device_id: UUID) -> list[DeviceLink]:
        """The device's links in this process, oldest first."""
        return list(self._links.get(device_id, ()))

    def connected(self, device_id: UUID) -> bool:
        """Whether the device has a link open in this process."""
        return device_id in self._links

    def devices(self) -> list[Device]:
        """Devices with at least one link open here."""
        return list(self._devices.values())

    def _tell(self, device: Device, link: DeviceLink, attached: bool) -> None:
        for listener in list(self._listeners):
            try:
                listener(device, link, attached)
            except Exception:  # one broken listener must not break the adapter calling us
                log.exception("link listener failed for device %s", device.id)


class DeviceInbox(Protocol):
    """What a device sends besides telemetry, as the adapters hand it over."""

    async def command_reply(self, device: Device, command_id: UUID, response: Any) -> None:
        """The device's answer to a two-way command (any JSON value)."""
        ...

    async def report_attributes(self, device: Device, values: Mapping[str, Any]) -> None:
        """The device reports client attributes."""
        ...

    async def request_attributes(
        self, device: Device, client_keys: Sequence[str] | None, shared_keys: Sequence[str] | None
    ) -> dict[str, dict[str, Any]]:
        """Current values, as {"client": {...}, "shared": {...}} (None: every key)."""
        ...

    async def client_rpc(self, device: Device, method: str, params: Any) -> Any:
        """A device asks the platform (ThingsBoard client-side RPC); the answer's JSON."""
        ...


class UnsupportedInbox:
    """The inbox until the command and attribute services are wired in: refuses clearly."""

    async def command_reply(self, device: Device, command_id: UUID, response: Any) -> None:
        """Refuse: commands are not available."""
        raise DeliveryFailed("commands are not available on this platform process")

    async def report_attributes(self, device: Device, values: Mapping[str, Any]) -> None:
        """Refuse: attributes are not available."""
        raise DeliveryFailed("attributes are not available on this platform process")

    async def request_attributes(
        self, device: Device, client_keys: Sequence[str] | None, shared_keys: Sequence[str] | None
    ) -> dict[str, dict[str, Any]]:
        """Refuse: attributes are not available."""
        raise DeliveryFailed("attributes are not available on this platform process")

    async def client_rpc(self, device: Device, method: str, params: Any) -> Any:
        """Refuse: no client-side RPC methods."""
        raise DeliveryFailed(f"unknown method {method!r}")
