"""The ingest pipeline: batching, acknowledgement after commit, backpressure, live bus.

Adapters call `submit(device_points, protocol)`; it returns once the batch holding those
points has committed, so the adapter may then acknowledge its peer (PUBACK, basic.ack,
2.04, 200). One writer task drains a bounded queue into `Store.write_points`, a batch at a
time (by size or by age). When the queue is full, `submit` waits: adapters slow their peers
down instead of dropping data. When the database is down, the writer retries the same batch
with bounded backoff; nothing accepted is lost, and writing resumes by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self

from iiot.bus import LiveBus, TelemetryEvent
from iiot.errors import IIoTError, StorageUnavailable
from iiot.metrics import Metrics
from iiot.model import DevicePoints
from iiot.supervisor import Backoff

__all__ = ["Pipeline", "PipelineSettings", "PointWriter"]

log = logging.getLogger(__name__)


class PointWriter(Protocol):
    """The part of the store the pipeline needs."""

    async def write_points(self, batch: Sequence[DevicePoints]) -> None:
        """Commit a batch in one transaction."""
        ...


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    """Batching and backpressure limits."""

    max_batch_points: int = 5000
    max_delay_s: float = 0.05
    queue_max_points: int = 200_000
    commit_timeout_s: float = 30.0


@dataclass(slots=True, eq=False)
class _Entry:
    item: DevicePoints
    protocol: str
    future: asyncio.Future[None]
    enqueued: float
    taken: bool = field(default=False)


class Pipeline:
    """Bounded, batching, ack-after-commit queue in front of the store."""

    def __init__(
        self,
        writer: PointWriter,
        bus: LiveBus,
        metrics: Metrics,
        settings: PipelineSettings = PipelineSettings(),
    ) -> None:
        self._writer = writer
        self._bus = bus
        self._metrics = metrics
        self._settings = settings
        self._entries: deque[_Entry] = deque()
        self._queued_points = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.storage_ok = True
        self.last_error: str | None = None

    async def __aenter__(self) -> Self:
        self._closing = False
        self._task = asyncio.create_task(self._run(), name="ingest-writer")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self, flush_timeout_s: float = 30.0) -> None:
        """Stop accepting, commit what is queued (up to a time limit), stop the writer."""
        self._closing = True
        async with self._changed:
            self._changed.notify_all()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), flush_timeout_s)
        except TimeoutError:
            log.error(
                "ingest queue not flushed within %.0f s; %d points not committed",
                flush_timeout_s,
                self._queued_points,
            )
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None
        for entry in self._entries:
            if not entry.future.done():
                entry.future.set_exception(StorageUnavailable("platform is shutting down"))
        self._entries.clear()

    @property
    def queued_points(self) -> int:
        """Points accepted but not yet committed."""
        return self._queued_points

    async def submit(self, item: DevicePoints, protocol: str) -> None:
        """Queue points and wait until they are committed.

        Raises `StorageUnavailable` when they could not be committed within the commit
        timeout (the device should retry; points already being written may still land,
        and rewriting the same (device, key, ts) keeps one row).
        """
        count = len(item.points)
        if count == 0:
            return
        if self._closing:
            raise StorageUnavailable("platform is shutting down")
        deadline = time.monotonic() + self._settings.commit_timeout_s
        limit = self._settings.queue_max_points
        async with self._changed:
            if self._queued_points + count > limit and self._queued_points > 0:
                try:
                    await asyncio.wait_for(
                        self._changed.wait_for(
                            lambda: (
                                self._queued_points + count <= limit
                                or self._queued_points == 0
                                or self._closing
                            )
                        ),
                        self._settings.commit_timeout_s,
                    )
                except TimeoutError:
                    raise StorageUnavailable(
                        "ingest queue is full: storage is not keeping up, retry later"
                    ) from None
                if self._closing:
                    raise StorageUnavailable("platform is shutting down")
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = _Entry(item, protocol, future, time.monotonic())
            self._entries.append(entry)
            self._queued_points += count
            self._metrics.queue_points.set(self._queued_points)
            self._changed.notify_all()
        try:
            await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            if not entry.taken:
                # Not yet handed to the store: withdraw it so a retry is the only copy.
                await self._withdraw(entry)
            raise StorageUnavailable(
                f"storage unavailable: {self.last_error or 'commit timed out'}"
            ) from None

    async def _withdraw(self, entry: _Entry) -> None:
        async with self._changed:
            with contextlib.suppress(ValueError):
                self._entries.remove(entry)
                self._queued_points -= len(entry.item.points)
                self._metrics.queue_points.set(self._queued_points)
                self._changed.notify_all()
        if not entry.future.done():
            entry.future.cancel()

    async def _next_batch(self) -> list[_Entry]:
        """Wait for the first entry, then until the batch is full or old enough."""
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._entries) or self._closing)
            if not self._entries:
                return []
            first = self._entries[0].enqueued
            max_points = self._settings.max_batch_points
            while self._queued_points < max_points and not self._closing:
                remaining = first + self._settings.max_delay_s - time.monotonic()
                if remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)
            batch: list[_Entry] = []
            points = 0
            while self._entries:
                entry = self._entries[0]
                size = len(entry.item.points)
                if batch and points + size > max_points:
                    break
                self._entries.popleft()
                entry.taken = True
                batch.append(entry)
                points += size
            return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                return  # closing and drained
            await self._commit(batch)

    async def _commit(self, batch: list[_Entry]) -> None:
        items = [entry.item for entry in batch]
        points = sum(len(item.points) for item in items)
        backoff = Backoff()
        while True:
            started = time.perf_counter()
            try:
                await self._writer.write_points(items)
            except StorageUnavailable as exc:
                self._metrics.storage_errors.inc()
                self.last_error = str(exc)
                if self.storage_ok:
                    log.error(
                        "storage unavailable, holding %d points and retrying: %s",
                        self._queued_points,
                        exc,
                    )
                    self.storage_ok = False
                await asyncio.sleep(backoff.next_delay())
                continue
            except IIoTError as exc:  # a batch the store refuses for good: tell the senders
                log.error("batch of %d points refused by storage: %s", points, exc)
                await self._finish(batch, points, exc)
                return
            break
        if not self.storage_ok:
            log.warning("storage available again; writing resumed")
            self.storage_ok = True
            self.last_error = None
        self._metrics.write_seconds.observe(time.perf_counter() - started)
        self._metrics.batch_points.observe(points)
        await self._finish(batch, points, None)
        self._bus.publish(TelemetryEvent(items))

    async def _finish(self, batch: list[_Entry], points: int, error: BaseException | None) -> None:
        for entry in batch:
            if error is None:
                self._metrics.points_stored.labels(entry.protocol).inc(len(entry.item.points))
            if not entry.future.done():
                if error is None:
                    entry.future.set_result(None)
                else:
                    entry.future.set_exception(error)
        async with self._changed:  # wake producers waiting for queue space
            self._queued_points -= points
            self._metrics.queue_points.set(self._queued_points)
            self._changed.notify_all()
