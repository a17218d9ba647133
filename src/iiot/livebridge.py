"""Live events between split roles through PostgreSQL LISTEN/NOTIFY.

With `--role api` and `--role ingest` in separate processes, each process has its own
`LiveBus`. Every process running a bridge NOTIFYs the events that arose locally (committed
telemetry, device and tenant changes) on one channel and LISTENs for the others' events, which it
publishes on its own bus. So points committed by the ingest role reach the API workers'
live views, and a device disabled or re-keyed through an API worker leaves the ingest
role's token cache at once (instead of after the cache's few seconds).

Live values are a view: while the connection is down, events are dropped (the database
keeps every point) and the bridge reconnects with the shared supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any, Self
from uuid import UUID

import asyncpg

from iiot import livebridge_pack
from iiot.bus import DeviceEvent, LiveEvent, RecordEvent, TelemetryEvent, TenantEvent
from iiot.model import Device, DevicePoints, Point, Tenant
from iiot.services import Services
from iiot.supervisor import cancel_and_wait, supervise

__all__ = ["CHANNEL", "LiveBridge", "decode", "encode"]

log = logging.getLogger(__name__)

CHANNEL = "iiot_live"
# PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
_MAX_PAYLOAD = 7800
# Events this process received from others and published locally; they come back through
# our own subscription and must not be sent out again. Bounded (see `_remember`).
_MAX_INJECTED = 10_000


def _device_json(device: Device) -> list[Any]:
    gateway = None if device.gateway_id is None else str(device.gateway_id)
    return [
        str(device.id),
        str(device.tenant_id),
        device.name,
        device.status,
        device.created_at,
        device.type,
        gateway,
        device.last_seen,
        device.connected,
    ]


def _device(raw: list[Any]) -> Device:
    device = Device(UUID(raw[0]), UUID(raw[1]), str(raw[2]), str(raw[3]), int(raw[4]))
    if len(raw) < 9:  # a process of the previous version
        return device
    return Device(
        device.id,
        device.tenant_id,
        device.name,
        device.status,
        device.created_at,
        type=str(raw[5]),
        gateway_id=None if raw[6] is None else UUID(raw[6]),
        last_seen=None if raw[7] is None else int(raw[7]),
        connected=bool(raw[8]),
    )


def _record_json(event: RecordEvent, origin: str) -> str:
    device = None if event.device_id is None else str(event.device_id)
    body = {
        "o": origin,
        "t": "record",
        "r": [event.topic, event.kind, str(event.tenant_id), device, event.data],
    }
    return json.dumps(body, separators=(",", ":"), default=str)


def _record(raw: list[Any]) -> RecordEvent:
    topic, kind, tenant, device, data = raw
    device_id = None if device is None else UUID(device)
    return RecordEvent(topic, str(kind), UUID(tenant), device_id, dict(data))


def _tenant_json(tenant: Tenant) -> list[Any]:
    return [str(tenant.id), tenant.name, tenant.created_at, tenant.retention_days]


def _tenant(raw: list[Any]) -> Tenant:
    retention = None if raw[3] is None else int(raw[3])
    return Tenant(UUID(raw[0]), str(raw[1]), int(raw[2]), retention)


def _fits(origin: str, kind: str, device: list[Any], points: list[list[Any]]) -> list[str]:
    """Payloads under the NOTIFY limit, splitting the points in halves when needed."""
    text = json.dumps({"o": origin, "t": kind, "d": device, "p": points}, separators=(",", ":"))
    if len(text.encode()) <= _MAX_PAYLOAD:
        return [text]
    if len(points) <= 1:
        log.warning("live value of device %s too large to forward; skipped", device[0])
        return []
    half = len(points) // 2
    return _fits(origin, kind, device, points[:half]) + _fits(origin, kind, device, points[half:])


def encode(event: LiveEvent, origin: str) -> list[str]:
    """An event as one or more NOTIFY payloads (JSON)."""
    if isinstance(event, TenantEvent):
        kind = f"tenant_{event.kind}"
        return [json.dumps({"o": origin, "t": kind, "n": _tenant_json(event.tenant)})]
    if isinstance(event, DeviceEvent):
        return _fits(origin, event.kind, _device_json(event.device), [])
    if isinstance(event, RecordEvent):
        text = _record_json(event, origin)
        if len(text.encode()) > _MAX_PAYLOAD:
            log.warning(
                "live %s event of device %s too large to forward", event.topic, event.device_id
            )
            return []
        return [text]
    payloads: list[str] = []
    for item in event.batch:
        points = [[p.key, p.ts, p.value] for p in item.points]
        payloads += _fits(origin, "telemetry", _device_json(item.device), points)
    return payloads


def decode(payload: str) -> tuple[str, LiveEvent]:
    """(origin, event) of a NOTIFY payload."""
    raw = json.loads(payload)
    kind = raw["t"]
    if kind in ("tenant_updated", "tenant_deleted"):
        return raw["o"], TenantEvent(kind.removeprefix("tenant_"), _tenant(raw["n"]))
    if kind == "record":
        return raw["o"], _record(raw["r"])
    if kind == livebridge_pack.KIND:
        return raw["o"], livebridge_pack.unpack(raw, _device)
    device = _device(raw["d"])
    if kind == "telemetry":
        points = tuple(Point(str(k), int(ts), v) for k, ts, v in raw["p"])
        return raw["o"], TelemetryEvent((DevicePoints(device, points),))
    if kind in ("created", "updated", "deleted"):
        return raw["o"], DeviceEvent(kind, device)
    raise ValueError(f"unknown live event kind {kind!r}")


class LiveBridge:
    """Forwards live events between platform processes sharing one PostgreSQL database."""

    name = "livebridge"

    def __init__(self, services: Services) -> None:
        self._services = services
        self._url = services.settings.effective_database_url
        self.origin = uuid.uuid4().hex[:16]
        self._injected: dict[int, LiveEvent] = {}
        self._task: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[LiveEvent] | None = None

    def describe(self) -> str:
        """Start-up log line."""
        return f"live bridge: PostgreSQL LISTEN/NOTIFY on channel {CHANNEL!r}"

    async def __aenter__(self) -> Self:
        self._queue = self._services.bus.subscribe()
        # Down until its connection listens: readiness must not say ready before that.
        self._services.health.set(self.name, "down", "connecting")
        self._task = asyncio.create_task(
            supervise("live bridge", self._serve, log, self._on_state), name="livebridge"
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._queue is not None:
            self._services.bus.unsubscribe(self._queue)
            self._queue = None
        self._services.health.set(self.name, "off", "stopped")

    def _on_state(self, up: bool, detail: str) -> None:
        self._services.health.set(self.name, "up" if up else "down", detail)

    async def _serve(self, connected: Callable[[], None]) -> None:
        queue = self._queue
        assert queue is not None
        conn = await asyncpg.connect(self._url, timeout=10)
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        try:
            await conn.add_listener(CHANNEL, self._on_notify)
            # Events from before the connection would be stale: live views want the present.
            while not queue.empty():
                self._forget(queue.get_nowait())
            connected()
            while not lost.is_set():
                get = asyncio.ensure_future(queue.get())
                closed = asyncio.ensure_future(lost.wait())
                try:
                    await asyncio.wait({get, closed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    closed.cancel()
                    if not get.done():
                        get.cancel()
                if not get.done() or get.cancelled():
                    break
                payloads = self._payloads([get.result()])
                if payloads:  # all in one round trip, in order
                    await conn.execute(
                        "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p", CHANNEL, payloads
                    )
        finally:
            with contextlib.suppress(Exception):  # the connection may already be gone
                await asyncio.wait_for(conn.close(), 5)

    def _payloads(self, events: list[LiveEvent]) -> list[str]:
        """Payloads of these events and of every other event waiting, in order; committed
        telemetry packed and coalesced (see `livebridge_pack`)."""
        queue = self._queue
        assert queue is not None
        while not queue.empty():
            events.append(queue.get_nowait())
        payloads: list[str] = []
        telemetry: list[TelemetryEvent] = []
        for event in events:
            if self._forget(event):
                continue  # came from another process: already everywhere
            if isinstance(event, TelemetryEvent):
                telemetry.append(event)
                continue
            if telemetry:  # keep the order: points before a later device change
                payloads += livebridge_pack.pack(telemetry, self.origin, _MAX_PAYLOAD, _device_json)
                telemetry = []
            payloads += encode(event, self.origin)
        if telemetry:
            payloads += livebridge_pack.pack(telemetry, self.origin, _MAX_PAYLOAD, _device_json)
        return payloads

    def _forget(self, event: LiveEvent) -> bool:
        """Whether the event was one we injected (and stop tracking it)."""
        return self._injected.pop(id(event), None) is event

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            origin, event = decode(payload)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("ignored a malformed live event: %s", exc)
            return
        if origin == self.origin:
            return
        if isinstance(event, DeviceEvent):
            # Another process changed the device: our cached copy (token, status) is stale.
            self._services.registry.forget(event.device.id)
        if len(self._injected) >= _MAX_INJECTED:
            self._injected.clear()
        self._injected[id(event)] = event
        self._services.bus.publish(event)
