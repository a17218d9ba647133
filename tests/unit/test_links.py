"""The way back to devices: link bookkeeping, and record events across processes."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from iiot.bus import RecordEvent
from iiot.links import DeviceLinks, OutboundCommand
from iiot.livebridge import decode, encode
from iiot.model import Device


class _Link:
    protocol = "test"
    listens_commands = True
    listens_attributes = False

    async def deliver_command(self, command: OutboundCommand) -> bool:
        return True

    async def deliver_attributes(self, shared: Mapping[str, Any], deleted: Sequence[str]) -> None:
        return None


def _device() -> Device:
    return Device(uuid.uuid4(), uuid.uuid4(), "press-1", "active", 1)


def test_a_device_is_connected_while_any_of_its_links_is_attached() -> None:
    links, device = DeviceLinks(), _device()
    seen: list[bool] = []
    links.add_listener(lambda _d, _l, attached: seen.append(attached))
    first, second = _Link(), _Link()
    links.attach(device, first)
    links.attach(device, second)
    links.detach(device.id, first)
    assert links.connected(device.id)
    assert links.links(device.id) == [second]
    links.detach(device.id, second)
    links.detach(device.id, second)  # a second detach is ignored
    assert not links.connected(device.id)
    assert seen == [True, True, False, False]


def test_a_failing_listener_does_not_stop_the_others() -> None:
    links, device = DeviceLinks(), _device()
    seen: list[bool] = []

    def broken(_d: Device, _l: Any, _a: bool) -> None:
        raise RuntimeError("boom")

    links.add_listener(broken)
    links.add_listener(lambda _d, _l, attached: seen.append(attached))
    links.attach(device, _Link())
    assert seen == [True]


def test_record_events_cross_processes_unchanged() -> None:
    event = RecordEvent("alarm", "raised", uuid.uuid4(), uuid.uuid4(), {"id": "a", "value": 81.5})
    [payload] = encode(event, "origin-1")
    origin, decoded = decode(payload)
    assert origin == "origin-1"
    assert decoded == event


def test_devices_keep_type_gateway_and_presence_across_processes() -> None:
    base = _device()
    device = Device(
        base.id,
        base.tenant_id,
        "child",
        "active",
        5,
        "sensor",
        uuid.uuid4(),
        1_767_225_600_000,
        True,
    )
    from iiot.bus import DeviceEvent

    [payload] = encode(DeviceEvent("updated", device), "o")
    _, decoded = decode(payload)
    assert isinstance(decoded, DeviceEvent)
    assert decoded.device == device
    assert device.active(1_767_225_600_000 + 599_000, 600)
    assert not device.active(1_767_225_600_000 + 601_000, 600)
