"""In-process live bus: committed telemetry, device and tenant changes, stored records.

Subscribers get their own bounded queue; a subscriber that falls behind loses its oldest
events (live values are a view; the database keeps every point), never slowing ingestion.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
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


RecordTopic = Literal["command", "alarm", "rule", "attributes", "connectivity"]


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


class LiveBus:
    """Fan-out of live events to any number of subscribers."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[LiveEvent]] = set()

    def subscribe(self, maxsize: int = 10_000) -> asyncio.Queue[LiveEvent]:
        """A new queue that receives every event published from now on."""
        queue: asyncio.Queue[LiveEvent] = asyncio.Queue(maxsize)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[LiveEvent]) -> None:
        """Stop delivering events to this queue."""
        self._queues.discard(queue)

    def publish(self, event: LiveEvent) -> None:
        """Deliver an event to every subscriber without waiting."""
        for queue in self._queues:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()  # drop the oldest: live views must not block ingest
            queue.put_nowait(event)
