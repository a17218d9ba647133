"""The one entry point of device data for every adapter: authenticate, decode, submit.

Adapters translate their protocol into a call here and map the error types to their own
answers (HTTP status, CoAP code, AMQP reject); the rules themselves live only here.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

from iiot.codec import Limits, parse_telemetry
from iiot.errors import (
    AuthenticationError,
    DeviceDisabled,
    InvalidPayload,
    PayloadTooLarge,
    StorageUnavailable,
)
from iiot.metrics import Metrics
from iiot.model import Device, DevicePoints, Point
from iiot.pipeline import Done, Pipeline
from iiot.presence import Presence
from iiot.registry import DeviceRegistry

__all__ = ["Decoder", "Ingestor", "refusal_reason"]

# A payload format: bytes, receipt time (Unix ms), limits -> points (e.g. JSON, SenML).
# Each decoder enforces every limit, the size limit first.
Decoder = Callable[[bytes, int, Limits], list[Point]]


def refusal_reason(exc: Exception) -> str:
    """A short, stable label for metrics and AMQP reject headers."""
    if isinstance(exc, PayloadTooLarge):
        return "too_large"
    if isinstance(exc, InvalidPayload):
        return "invalid_payload"
    if isinstance(exc, AuthenticationError):
        return "unknown_token"
    if isinstance(exc, DeviceDisabled):
        return "device_disabled"
    if isinstance(exc, StorageUnavailable):
        return "storage_unavailable"
    return "error"


class Ingestor:
    """Turns a device's raw message into committed points."""

    def __init__(
        self,
        registry: DeviceRegistry,
        pipeline: Pipeline,
        metrics: Metrics,
        limits: Limits,
        presence: Presence | None = None,
    ) -> None:
        self.presence = Presence() if presence is None else presence
        self.registry = registry
        self.pipeline = pipeline
        self.metrics = metrics
        self.limits = limits
        self._by_protocol: dict[str, tuple[Any, Any]] = {}
        self._waiting: set[asyncio.Future[None]] = set()  # fast-path messages waiting for space

    async def ingest_token(
        self, token: str, body: bytes, protocol: str, decode: Decoder = parse_telemetry
    ) -> int:
        """Authenticate by token, then ingest; returns the number of points stored."""
        try:
            device = await self.registry.authenticate(token)
        except AuthenticationError as exc:
            self.refused(protocol, exc)
            raise
        return await self.ingest(device, body, protocol, decode)

    async def ingest(
        self, device: Device, body: bytes, protocol: str, decode: Decoder = parse_telemetry
    ) -> int:
        """Check, decode and commit one telemetry message of a known device."""
        item = self._decode(device, body, protocol, decode)
        try:
            await self.pipeline.submit(item, protocol)
        except StorageUnavailable as exc:
            self.refused(protocol, exc, counted=True)
            raise
        return len(item.points)

    def ingest_nowait(
        self,
        device: Device,
        body: bytes,
        protocol: str,
        on_done: Done,
        decode: Decoder = parse_telemetry,
    ) -> None:
        """Check, decode and queue a message without waiting (adapters' fast path).

        Raises what `ingest` raises before the commit. Then `on_done(None)` is called once
        the points are committed, or `on_done(error)` with what `ingest` would raise (the
        caller counts a `StorageUnavailable` with `refused(..., counted=True)`).
        """
        self.commit_nowait(self._decode(device, body, protocol, decode), protocol, on_done)

    def decode(
        self, device: Device, body: bytes, protocol: str, decode: Decoder = parse_telemetry
    ) -> DevicePoints:
        """Check and decode a message once (counted, refusals too), without committing it.

        Points without `ts` are stamped with the receipt time here, so an adapter that
        retries a message keeps these points and passes them to `commit`/`commit_nowait`
        again: a retry rewrites the same (device, key, ts) instead of a second copy.
        """
        return self._decode(device, body, protocol, decode)

    async def commit(self, item: DevicePoints, protocol: str) -> int:
        """Commit decoded points (from `decode`); returns how many were stored."""
        try:
            await self.pipeline.submit(item, protocol)
        except StorageUnavailable as exc:
            self.refused(protocol, exc, counted=True)
            raise
        return len(item.points)

    def commit_nowait(self, item: DevicePoints, protocol: str, on_done: Done) -> None:
        """Queue decoded points without waiting; `on_done` as for `ingest_nowait`."""
        if not item.points:
            on_done(None)
            return
        try:
            queued = self.pipeline.enqueue(item, protocol, on_done)
        except StorageUnavailable as exc:
            self.refused(protocol, exc, counted=True)
            raise
        if not queued:  # the queue is full: wait for space in a task
            task = asyncio.ensure_future(self.pipeline.submit(item, protocol))
            self._waiting.add(task)
            task.add_done_callback(functools.partial(self._settled, on_done))

    def _settled(self, on_done: Done, task: asyncio.Future[None]) -> None:
        self._waiting.discard(task)
        if task.cancelled():
            on_done(StorageUnavailable("platform is shutting down"))
        else:
            on_done(task.exception())

    def _decode(self, device: Device, body: bytes, protocol: str, decode: Decoder) -> DevicePoints:
        counters = self._counters(protocol)
        counters[0].inc()
        try:
            if device.disabled:
                raise DeviceDisabled(f"device {device.name!r} is disabled")
            now_ms = int(time.time() * 1000)
            self.presence.seen(device.id, now_ms)  # refused messages count: the device is there
            points = decode(body, now_ms, self.limits)
        except (DeviceDisabled, InvalidPayload) as exc:
            self.refused(protocol, exc, counted=True)
            raise
        counters[1].inc(len(points))
        return DevicePoints(device, tuple(points))

    def _counters(self, protocol: str) -> tuple[Any, Any]:
        """The (messages received, points received) counters of a protocol, cached."""
        counters = self._by_protocol.get(protocol)
        if counters is None:
            metrics = self.metrics
            counters = (
                metrics.messages_received.labels(protocol),
                metrics.points_received.labels(protocol),
            )
            self._by_protocol[protocol] = counters
        return counters

    def refused(self, protocol: str, exc: Exception, counted: bool = False) -> None:
        """Count a refused message (and the message itself, if not yet counted)."""
        if not counted:
            self._counters(protocol)[0].inc()
        if isinstance(exc, AuthenticationError):
            self.metrics.auth_failures.labels(protocol).inc()
        self.metrics.messages_refused.labels(protocol, refusal_reason(exc)).inc()
