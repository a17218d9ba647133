"""A subscriber may ask the live bus for only the events it follows: the others are not
queued for it (not woken for them), and what it wants still arrives in order."""

from __future__ import annotations

import uuid

from iiot.adapters.opcua import _mirrored
from iiot.alarms.engine import _evaluated
from iiot.bus import DeviceEvent, LiveBus, LiveEvent, RecordEvent, TelemetryEvent, record_topics
from iiot.model import Device, DevicePoints, Point

DEVICE = Device(uuid.uuid4(), uuid.uuid4(), "press-1", "active")


def _record(topic: str, kind: str) -> RecordEvent:
    return RecordEvent(topic, kind, DEVICE.tenant_id, DEVICE.id, {"id": kind})  # type: ignore[arg-type]


def _drain(queue: object) -> list[LiveEvent]:
    events = []
    while not queue.empty():  # type: ignore[attr-defined]
        events.append(queue.get_nowait())  # type: ignore[attr-defined]
    return events


def test_subscribers_get_only_what_they_want() -> None:
    bus = LiveBus()
    everything = bus.subscribe()
    commands = bus.subscribe(wants=record_topics("command"))
    engine = bus.subscribe(wants=_evaluated)
    mirror = bus.subscribe(wants=_mirrored)
    events: list[LiveEvent] = [
        _record("command", "QUEUED"),
        TelemetryEvent((DevicePoints(DEVICE, (Point("t", 1_767_225_600_000, 1.0),)),)),
        _record("alarm", "raised"),
        DeviceEvent("updated", DEVICE),
        _record("command", "SENT"),
        _record("rule", "created"),
        _record("connectivity", "connected"),
    ]
    for event in events:
        bus.publish(event)
    assert _drain(everything) == events
    assert _drain(commands) == [events[0], events[4]]
    assert _drain(engine) == [events[1], events[3], events[5]]
    assert _drain(mirror) == [events[1], events[3], events[6]]
