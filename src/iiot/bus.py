"""In-process live bus: committed telemetry, device and tenant changes, stored records.

Subscribers get their own bounded queue; a subscriber that falls behind loses its oldest
events (live values are a view; the database keeps every point), never slowing ingestion.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

from iiot.model import Device, DevicePoints, Tenant

__all__ = [
    "DeviceEvent",
    "LiveBus",
    "LiveEvent",
    "RecordEvent",
    "TelemetryEvent",
    "TenantEvent",
    "Wants",
    "record_topics",
]


@dataclass(frozen=True, slots=True)
class TelemetryEvent:
    """Points that were committed to storage."""

    batch: Sequence[DevicePoints]


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """A device was created, changed (name, status, token) or deleted."""

    kind: Literal["created", "updated", "deleted"]
    device: Device


@dataclass(frozen=True, slots=True)
class TenantEvent:
    """A tenant was changed (name, retention) or deleted (its devices' events come first)."""

    kind: Literal["updated", "deleted"]
    tenant: Tenant


RecordTopic = Literal["command", "alarm", "rule", "attributes", "connectivity", "webhook"]


@dataclass(frozen=True, slots=True)
class RecordEvent:
    """A stored change of a command, alarm, rule, attribute set or device connectivity.

    `data` is the record's REST representation (JSON-ready), so the live channel, webhooks
    and the bridge between processes forward it as it is.
    """

    topic: RecordTopic
    kind: str  # e.g. a command's new status, "raised"/"acked"/"cleared", "connected"
    tenant_id: UUID
    device_id: UUID | None
    data: Mapping[str, Any]


LiveEvent = TelemetryEvent | DeviceEvent | TenantEvent | RecordEvent


def record_topics(*topics: RecordTopic) -> Wants:
    """`subscribe(wants=...)` for a subscriber that follows only these record topics."""
    wanted = frozenset(topics)
    return lambda event: isinstance(event, RecordEvent) and event.topic in wanted


# Bounds of what live views may hold (item: bounded bus events): a committed batch of up to
# 5,000 points is published as events of at most this many points, and each subscriber
# queue holds at most `max_points` points (the oldest events are dropped beyond).
MAX_EVENT_POINTS = 500
MAX_QUEUED_POINTS = 200_000


def _points(event: LiveEvent) -> int:
    if isinstance(event, TelemetryEvent):
        return sum(len(item.points) for item in event.batch)
    return 0


Wants = Callable[[LiveEvent], bool]


class _EventQueue(asyncio.Queue[LiveEvent]):
    """An event queue that knows how many points it holds, and which events it wants."""

    def __init__(self, maxsize: int, max_points: int, wants: Wants | None) -> None:
        super().__init__(maxsize)
        self.points = 0
        self.max_points = max_points
        self.wants = wants

    def _put(self, item: LiveEvent) -> None:
        self.points += _points(item)
        super()._put(item)

    def _get(self) -> LiveEvent:
        item: LiveEvent = super()._get()
        self.points -= _points(item)
        return item


class LiveBus:
    """Fan-out of live events to any number of subscribers."""

    def __init__(self) -> None:
        self._queues: set[_EventQueue] = set()

    def subscribe(
        self,
        maxsize: int = 10_000,
        max_points: int = MAX_QUEUED_POINTS,
        *,
        wants: Wants | None = None,
    ) -> asyncio.Queue[LiveEvent]:
        """A new queue that receives every event published from now on, or only those
        `wants(event)` accepts: a subscriber that ignores most events is not woken for each
        (a command's five state changes woke every subscriber of the process)."""
        queue = _EventQueue(maxsize, max_points, wants)
        self._queues.add(queue)
        return queue

    def publish_points(self, items: Sequence[DevicePoints]) -> None:
        """Publish committed points as events of at most `MAX_EVENT_POINTS` points each."""
        chunk: list[DevicePoints] = []
        size = 0
        for item in items:
            count = len(item.points)
            if count > MAX_EVENT_POINTS:  # one message larger than an event: split it
                if chunk:
                    self.publish(TelemetryEvent(chunk))
                    chunk, size = [], 0
                for start in range(0, count, MAX_EVENT_POINTS):
                    part = item.points[start : start + MAX_EVENT_POINTS]
                    self.publish(TelemetryEvent((DevicePoints(item.device, part),)))
                continue
            if chunk and size + count > MAX_EVENT_POINTS:
                self.publish(TelemetryEvent(chunk))
                chunk, size = [], 0
            chunk.append(item)
            size += count
        if chunk:
            self.publish(TelemetryEvent(chunk))

    def unsubscribe(self, queue: asyncio.Queue[LiveEvent]) -> None:
        """Stop delivering events to this queue."""
        self._queues.discard(queue)  # type: ignore[arg-type, unused-ignore]

    def publish(self, event: LiveEvent) -> None:
        """Deliver an event to every subscriber without waiting."""
        points = _points(event)
        for queue in self._queues:
            if queue.wants is not None and not queue.wants(event):
                continue
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()  # drop the oldest: live views must not block ingest
            while queue.points and queue.points + points > queue.max_points:
                queue.get_nowait()  # the same, bounded in points
            queue.put_nowait(event)
