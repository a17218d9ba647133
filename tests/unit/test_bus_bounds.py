"""The live bus is bounded in points (item 8): a 5,000-point batch reaches subscribers as
events of at most 500 points, and a subscriber that does not read holds a bounded number
of points (oldest dropped), while every point still arrives for one that keeps up."""

from __future__ import annotations

import uuid

from iiot.bus import LiveBus, TelemetryEvent
from iiot.model import Device, DevicePoints, Point

DEVICE = Device(uuid.uuid4(), uuid.uuid4(), "press-1", "active")


def _items(messages: int, points: int) -> list[DevicePoints]:
    return [
        DevicePoints(DEVICE, tuple(Point(f"k{j}", m, j) for j in range(points)))
        for m in range(messages)
    ]


def test_a_large_batch_is_published_in_bounded_events() -> None:
    bus = LiveBus()
    queue = bus.subscribe()
    bus.publish_points(_items(1000, 5) + _items(1, 1200))  # 5,000 points + one large message
    sizes = []
    while not queue.empty():
        event = queue.get_nowait()
        assert isinstance(event, TelemetryEvent)
        sizes.append(sum(len(item.points) for item in event.batch))
    assert sum(sizes) == 6200
    assert max(sizes) <= 500


def test_a_slow_subscriber_holds_a_bounded_number_of_points() -> None:
    bus = LiveBus()
    slow = bus.subscribe(max_points=2_000)
    for _ in range(100):
        bus.publish_points(_items(100, 5))
    held = 0
    while not slow.empty():
        event = slow.get_nowait()
        assert isinstance(event, TelemetryEvent)
        held += sum(len(item.points) for item in event.batch)
    assert 0 < held <= 2_000
