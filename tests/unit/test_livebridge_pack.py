"""Committed telemetry packed for the live bridge: newest point per key, under the limit."""

from __future__ import annotations

import uuid

from iiot.bus import TelemetryEvent
from iiot.livebridge import decode
from iiot.livebridge_pack import pack
from iiot.model import Device, DevicePoints, Point

LIMIT = 7800


def _device(index: int) -> Device:
    return Device(uuid.uuid4(), uuid.uuid4(), f"device-{index}", "active", 0)


def _json(device: Device) -> list[object]:
    return [str(device.id), str(device.tenant_id), device.name, device.status, device.created_at]


def test_many_batches_become_few_payloads_with_the_newest_value_of_each_key() -> None:
    devices = [_device(i) for i in range(500)]
    events = [
        TelemetryEvent(
            [
                DevicePoints(d, (Point("t", ts, ts * 0.5), Point("on", ts, ts % 2 == 0)))
                for d in devices
            ]
        )
        for ts in (1000, 3000, 2000)  # the last batch carries older points
    ]
    payloads = pack(events, "me", LIMIT, _json)
    assert all(len(p.encode()) <= LIMIT for p in payloads)
    assert len(payloads) < len(devices) // 10
    seen: dict[tuple[uuid.UUID, str], Point] = {}
    for payload in payloads:
        origin, event = decode(payload)
        assert origin == "me" and isinstance(event, TelemetryEvent)
        for item in event.batch:
            for point in item.points:
                assert (item.device.id, point.key) not in seen
                seen[(item.device.id, point.key)] = point
    assert len(seen) == 2 * len(devices)
    assert {p.ts for p in seen.values()} == {3000}
    assert seen[(devices[7].id, "t")].value == 1500.0
    assert seen[(devices[7].id, "on")].value is True


def test_a_device_with_many_keys_is_split_and_a_huge_value_is_left_out() -> None:
    device = _device(0)
    points = tuple(Point(f"key-{i:04d}", 1, float(i)) for i in range(1000))
    huge = Point("blob", 1, "x" * 10_000)
    payloads = pack([TelemetryEvent([DevicePoints(device, (*points, huge))])], "me", LIMIT, _json)
    assert len(payloads) > 1 and all(len(p.encode()) <= LIMIT for p in payloads)
    keys = [p.key for payload in payloads for item in decode(payload)[1].batch for p in item.points]
    assert sorted(keys) == sorted(p.key for p in points)
