"""Fan-out of live bus events to browser viewers, coalescing for slow ones.

One hub per API app reads the live bus (fed locally and, between split roles, by the
live bridge) and offers every event to each connected viewer. Telemetry is first coalesced
in the hub, the newest values per device over `COALESCE_S`, and only then handed to the
viewers: the cost of a viewer grows with the devices that changed, not with the messages
ingested (100 open consoles once took half the ingest capacity). A viewer keeps at most one
pending message per key (a device's latest values, a record's latest state) and at most
`MAX_PENDING` keys: a browser that reads slowly sees fewer, newer updates, and ingestion
never waits for it (the bus drops the hub's oldest events if even the hub falls behind).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from iiot.bus import DeviceEvent, LiveBus, LiveEvent, RecordEvent, TelemetryEvent
from iiot.supervisor import cancel_and_wait

__all__ = ["TOPICS", "IngestRate", "LiveHub", "Viewer"]

# What a viewer can subscribe to; "device" covers created/updated/deleted devices.
TOPICS = frozenset({"telemetry", "device", "connectivity", "alarm", "command", "attributes"})
# Keys a viewer may have waiting; past that, new keys are dropped (and counted).
MAX_PENDING = 2000
# The hub's own queue on the bus: drop-oldest when full, so ingestion never waits.
_HUB_QUEUE = 5000
# Telemetry is handed to viewers at most this often (seconds); they flush every 0.2 s.
COALESCE_S = 0.05
# Seconds of history for the ingest rate.
RATE_WINDOW_S = 60

Message = dict[str, Any]
DeviceJson = Callable[[Any], dict[str, Any]]


@dataclass(eq=False)
class Viewer:
    """One live connection: its tenant scope, subscriptions and pending messages."""

    scope: UUID | None  # None: every tenant (sysadmin)
    subscriptions: dict[str, set[UUID | None]] = field(default_factory=dict)
    pending: dict[tuple[str, str], Message] = field(default_factory=dict)
    dropped: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def wants(self, topic: str, tenant_id: UUID, device_id: UUID | None) -> bool:
        """Whether this viewer may see and asked for this event."""
        if self.scope is not None and tenant_id != self.scope:
            return False
        devices = self.subscriptions.get(topic)
        if not devices:
            return False
        return None in devices or device_id in devices

    def put(self, key: tuple[str, str], message: Message) -> None:
        """Queue a message; a newer one with the same key replaces it."""
        if key not in self.pending and len(self.pending) >= MAX_PENDING:
            self.dropped += 1
            return
        self.pending[key] = message
        self.wake.set()

    def merge_values(self, message: Message) -> None:
        """Queue a device's latest values, merged with any still waiting (newest ts wins).

        The message is shared by every viewer: a merge builds a new one, never changes it."""
        key = ("telemetry", message["device_id"])
        waiting = self.pending.get(key)
        if waiting is None:
            self.put(key, message)
            return
        data = dict(waiting["data"])
        _merge_newest(data, message["data"])
        self.pending[key] = {**message, "data": data}
        self.wake.set()

    def take(self) -> list[Message]:
        """Everything waiting, in arrival order, and a note of what was dropped."""
        messages = list(self.pending.values())
        self.pending = {}
        if self.dropped:
            messages.append({"type": "dropped", "count": self.dropped})
            self.dropped = 0
        self.wake.clear()
        return messages


def _merge_newest(into: dict[str, dict[str, Any]], values: dict[str, dict[str, Any]]) -> None:
    """Merge `{key: {"ts", "value"}}` items into `into`; the newest ts of a key wins."""
    for name, item in values.items():
        old = into.get(name)
        if old is None or item["ts"] >= old["ts"]:
            into[name] = item


class IngestRate:
    """Points committed per second over the last minute, per tenant."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()
        self._seconds: deque[tuple[int, dict[UUID, int]]] = deque()

    def add(self, tenant_id: UUID, points: int) -> None:
        """Count committed points."""
        now = int(self._clock())
        if not self._seconds or self._seconds[-1][0] != now:
            self._seconds.append((now, {}))
            while self._seconds and self._seconds[0][0] <= now - RATE_WINDOW_S:
                self._seconds.popleft()
        bucket = self._seconds[-1][1]
        bucket[tenant_id] = bucket.get(tenant_id, 0) + points

    def per_second(self, scope: UUID | None) -> float:
        """Average points per second within the scope over the window (or since start)."""
        now = self._clock()
        window = min(float(RATE_WINDOW_S), max(1.0, now - self._started))
        total = 0
        for second, counts in self._seconds:
            if second > now - window - 1:
                total += sum(counts.values()) if scope is None else counts.get(scope, 0)
        return round(total / window, 2)


class LiveHub:
    """Reads the live bus once and offers each event to every viewer."""

    def __init__(self, bus: LiveBus, device_json: DeviceJson) -> None:
        self._bus = bus
        self._device_json = device_json
        self._viewers: set[Viewer] = set()
        self._task: asyncio.Task[None] | None = None
        # Telemetry not yet handed to viewers: device id -> (device, newest values).
        self._changes: dict[UUID, tuple[Any, dict[str, dict[str, Any]]]] = {}
        self._handout: asyncio.TimerHandle | None = None
        self.rate = IngestRate()

    def ensure_started(self) -> None:
        """Start reading the bus (lazily: the API has no start-up hook of its own)."""
        if self._task is not None and not self._task.done():
            return
        queue = self._bus.subscribe(_HUB_QUEUE)
        self._task = asyncio.get_running_loop().create_task(self._run(queue), name="live-hub")

    def attach(self, viewer: Viewer) -> None:
        """Start offering events to a viewer."""
        self.ensure_started()
        self._viewers.add(viewer)

    def detach(self, viewer: Viewer) -> None:
        """Stop offering events to a viewer."""
        self._viewers.discard(viewer)

    @property
    def viewers(self) -> int:
        """Connected viewers."""
        return len(self._viewers)

    async def _run(self, queue: asyncio.Queue[LiveEvent]) -> None:
        try:
            loop = asyncio.get_running_loop()
            while True:
                self.offer(await queue.get())
                if self._changes and self._handout is None:
                    self._handout = loop.call_later(COALESCE_S, self.hand_out)
        finally:
            self._bus.unsubscribe(queue)
            if self._handout is not None:
                self._handout.cancel()

    async def stop(self) -> None:
        """Stop reading the bus."""
        await cancel_and_wait(self._task)

    def offer(self, event: LiveEvent) -> None:
        """Take one bus event: telemetry is kept for `hand_out`; anything else goes to every
        viewer that may see it and asked for it, after the telemetry that came before it."""
        if isinstance(event, TelemetryEvent):
            self._telemetry(event)
            return
        self.hand_out()
        if isinstance(event, DeviceEvent):
            device = event.device
            message: Message = {
                "type": "device",
                "kind": event.kind,
                "device_id": str(device.id),
                "data": self._device_json(device),
            }
            for viewer in self._viewers:
                if viewer.wants("device", device.tenant_id, device.id):
                    viewer.put(("device", str(device.id)), message)
        elif isinstance(event, RecordEvent):
            device_id = None if event.device_id is None else str(event.device_id)
            record_id = str(event.data.get("id", device_id))
            message = {
                "type": event.topic,
                "kind": event.kind,
                "device_id": device_id,
                "data": dict(event.data),
            }
            for viewer in self._viewers:
                if viewer.wants(event.topic, event.tenant_id, event.device_id):
                    viewer.put((event.topic, record_id), message)

    def _telemetry(self, event: TelemetryEvent) -> None:
        changes = self._changes
        for item in event.batch:
            device = item.device
            self.rate.add(device.tenant_id, len(item.points))
            if not self._viewers:
                continue
            values = {p.key: {"ts": p.ts, "value": p.value} for p in item.points}
            known = changes.get(device.id)
            if known is None:
                changes[device.id] = (device, values)
            else:
                _merge_newest(known[1], values)

    def hand_out(self) -> None:
        """Give the coalesced telemetry to the viewers that asked for it."""
        self._handout = None
        changes, self._changes = self._changes, {}
        for device, values in changes.values():
            message: Message | None = None
            for viewer in self._viewers:
                if viewer.wants("telemetry", device.tenant_id, device.id):
                    if message is None:
                        message = {"type": "telemetry", "device_id": str(device.id), "data": values}
                    viewer.merge_values(message)
