"""The live hub: tenant scope, per-key coalescing for slow viewers, a bounded backlog."""

from __future__ import annotations

import uuid

from iiot.api.livehub import MAX_PENDING, LiveHub, Viewer
from iiot.bus import DeviceEvent, LiveBus, LiveEvent, RecordEvent, TelemetryEvent
from iiot.model import Device, DevicePoints, Point


def _device(tenant: uuid.UUID) -> Device:
    return Device(uuid.uuid4(), tenant, "d", "active")


def _points(device: Device, **values: float) -> TelemetryEvent:
    return TelemetryEvent(
        [DevicePoints(device, tuple(Point(k, int(v), v) for k, v in values.items()))]
    )


def _offer(hub: LiveHub, *events: LiveEvent) -> None:
    """Offer events, then hand out what the hub coalesced (its timer does that when live)."""
    for event in events:
        hub.offer(event)
    hub.hand_out()


def _hub(*viewers: Viewer) -> LiveHub:
    hub = LiveHub(LiveBus(), lambda d: {"id": str(d.id), "status": d.status})
    for viewer in viewers:
        hub._viewers.add(viewer)  # attach() would start reading the bus
    return hub


def test_a_slow_viewer_gets_one_message_per_device_with_the_newest_values() -> None:
    tenant = uuid.uuid4()
    device = _device(tenant)
    viewer = Viewer(tenant, {"telemetry": {device.id}})
    hub = _hub(viewer)
    for i in range(10_000):
        hub.offer(_points(device, a=float(i), **({"b": float(i)} if i % 2 else {})))
        if i % 1000 == 0:
            hub.hand_out()  # some handed out while the viewer does not read
    hub.hand_out()
    [message] = viewer.take()
    assert message["device_id"] == str(device.id)
    assert message["data"]["a"]["value"] == 9999.0
    assert message["data"]["b"]["value"] == 9999.0
    assert viewer.take() == []


def test_an_older_point_does_not_replace_a_newer_waiting_one() -> None:
    tenant = uuid.uuid4()
    device = _device(tenant)
    viewer = Viewer(tenant, {"telemetry": {None}})
    hub = _hub(viewer)
    _offer(hub, _points(device, a=50.0))
    _offer(hub, _points(device, a=10.0))
    [message] = viewer.take()
    assert message["data"]["a"] == {"ts": 50, "value": 50.0}


def test_the_backlog_is_bounded_and_what_was_dropped_is_said() -> None:
    tenant = uuid.uuid4()
    viewer = Viewer(tenant, {"telemetry": {None}})
    hub = _hub(viewer)
    _offer(hub, *(_points(_device(tenant), a=1.0) for _ in range(MAX_PENDING + 25)))
    messages = viewer.take()
    assert len(messages) == MAX_PENDING + 1
    assert messages[-1] == {"type": "dropped", "count": 25}


def test_other_tenants_and_unsubscribed_topics_are_never_queued() -> None:
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    own, other = _device(mine), _device(theirs)
    viewer = Viewer(mine, {"telemetry": {None}, "alarm": {None}})
    sysadmin = Viewer(None, {"telemetry": {None}, "device": {None}})
    hub = _hub(viewer, sysadmin)
    _offer(
        hub,
        _points(other, a=1.0),
        RecordEvent("alarm", "raised", theirs, other.id, {"id": "x"}),
        DeviceEvent("updated", own),  # not subscribed to "device"
    )
    assert viewer.take() == []
    _offer(
        hub,
        _points(own, a=2.0),
        RecordEvent("alarm", "raised", mine, own.id, {"id": "y", "severity": "MAJOR"}),
    )
    assert [m["type"] for m in viewer.take()] == ["telemetry", "alarm"]
    assert {m["type"] for m in sysadmin.take()} == {"telemetry", "device"}


def test_the_ingest_rate_counts_points_per_tenant() -> None:
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    hub = _hub()
    _offer(hub, _points(_device(mine), a=1.0, b=2.0), _points(_device(theirs), a=1.0))
    assert hub.rate.per_second(mine) == 2.0
    assert hub.rate.per_second(None) == 3.0


def test_viewers_share_a_message_and_a_merge_never_changes_another_viewers_copy() -> None:
    tenant = uuid.uuid4()
    device = _device(tenant)
    reader, idler = (Viewer(tenant, {"telemetry": {None}}) for _ in range(2))
    hub = _hub(reader, idler)
    _offer(hub, _points(device, a=1.0))
    [first] = reader.take()
    _offer(hub, _points(device, b=2.0))  # merged into what the idle viewer has waiting
    [merged] = idler.take()
    assert first["data"] == {"a": {"ts": 1, "value": 1.0}}
    assert merged["data"] == {"a": {"ts": 1, "value": 1.0}, "b": {"ts": 2, "value": 2.0}}
