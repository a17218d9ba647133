"""The ingest pipeline: group commit, acknowledgement after commit, backpressure, live bus.

Adapters call `submit(device_points, protocol)`; it returns once the batch holding those
points has committed, so the adapter may then acknowledge its peer (PUBACK, basic.ack,
2.04, 200). Writer tasks (`writers`, each with a batch in flight) drain a bounded queue
into `Store.write_points`; senders hear of their batch in arrival order. Batching is by
group commit: an idle writer writes what is queued at once, and while writes are in
flight the next batch grows by itself (up to `max_batch_points`); a `max_delay_s` above
zero makes an idle writer also wait that long for a fuller batch.
When the queue is full, `submit` waits: adapters slow their peers down instead of dropping
data. When the database is down, the writer retries the same batch with bounded backoff;
nothing accepted is lost, and writing resumes by itself.

Hot path: nothing here takes an asyncio lock or creates a task or timer per message (an
asyncio.Condition around the queue made producers convoy behind its lock, and each
`wait_for` per message cost a timer and a task). One sweeper task enforces the commit
timeout: the queue is in arrival order, so it only ever looks at the oldest entries.

Here: admission and backpressure, the commit timeout and the building of batches. The
writer tasks (commit, isolation, telling senders) are `pipeline_commit`; what is queued,
`pipeline_entries`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from iiot.bus import LiveBus
from iiot.errors import StorageUnavailable
from iiot.metrics import Metrics
from iiot.model import DevicePoints
from iiot.pipeline_commit import PipelineCommit
from iiot.pipeline_entries import Done, PointWriter, _Callback, _Entry, _InFlight

__all__ = ["Done", "Pipeline", "PipelineSettings", "PointWriter"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    """Batching and backpressure limits."""

    max_batch_points: int = 5000
    # 0: group commit (an idle writer writes at once); > 0: an idle writer first waits up
    # to this long (from the oldest queued message) for a fuller batch.
    max_delay_s: float = 0.0
    queue_max_points: int = 200_000
    commit_timeout_s: float = 30.0
    # Batches written at once (each on its own connection): the next batch is built and
    # sent while the previous one commits. Senders still hear in arrival order.
    writers: int = 4


class Pipeline(PipelineCommit):
    """Bounded, group-committing, ack-after-commit queue in front of the store."""

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
        self._queued_points = 0  # accepted, not yet committed (queued or being written)
        self._waiting_points = 0  # queued, not yet taken by a writer
        self._in_flight: list[_InFlight] = []
        self._writing = 0  # batches being written now
        # Entries that waited for queue space carry an older deadline than their place in
        # the queue suggests: the sweeper watches them in a heap of their own.
        self._late: list[tuple[float, int, _Entry]] = []
        self._late_seq = itertools.count()
        self._work = asyncio.Event()  # set when a writer has something to do
        self._wake_at = 1  # waiting points at which an enqueue wakes the writer
        self._space = asyncio.Event()  # set when queue space was freed
        self._stored: dict[str, Any] = {}  # protocol -> points_stored child (cached)
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.storage_ok = True
        self.last_error: str | None = None

    async def __aenter__(self) -> Self:
        self._closing = False
        count = max(1, self._settings.writers)
        self._tasks = [
            asyncio.create_task(self._run(), name=f"ingest-writer-{i}") for i in range(count)
        ]
        self._tasks.append(asyncio.create_task(self._sweep(), name="ingest-timeouts"))
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
        self._work.set()
        self._space.set()
        if not self._tasks:
            return
        writers, sweeper = self._tasks[:-1], self._tasks[-1]
        done, pending = await asyncio.wait(writers, timeout=flush_timeout_s)
        if pending:
            log.error(
                "ingest queue not flushed within %.0f s; %d points not committed",
                flush_timeout_s,
                self._queued_points,
            )
        for task in (*pending, sweeper):
            task.cancel()
        for task in (*pending, sweeper):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for task in done:
            task.result()  # a writer that crashed: surface it
        self._tasks = []
        shutting_down = StorageUnavailable("platform is shutting down")
        for entry in self._entries:
            if not entry.future.done():
                entry.future.set_exception(shutting_down)
        for flight in self._in_flight:
            for entry in flight.batch:
                if not entry.future.done():
                    entry.future.set_exception(shutting_down)
        self._entries.clear()
        self._in_flight.clear()
        self._late.clear()

    @property
    def queued_points(self) -> int:
        """Points accepted but not yet committed."""
        return self._queued_points

    def try_enqueue(self, item: DevicePoints, protocol: str) -> asyncio.Future[None] | None:
        """Queue points without waiting; None when the queue is full (then use `submit`).

        The future completes when the points are committed; it fails with
        `StorageUnavailable` when they were not committed within the commit timeout, or
        with the store's error when it refused the batch for good.
        """
        if not self._has_room(item):
            return None
        now = time.monotonic()
        return self._enqueue(item, protocol, now, now + self._settings.commit_timeout_s)

    def enqueue(self, item: DevicePoints, protocol: str, on_done: Done) -> bool:
        """Queue points without waiting; False (nothing queued) when the queue is full.

        `on_done(None)` is called once the points are committed, `on_done(error)` when they
        were not (as for `try_enqueue`'s future), from the writer task, in arrival order.
        The cheapest way in, for adapters that acknowledge from a callback anyway.
        """
        if not self._has_room(item):
            return False
        now = time.monotonic()
        self._append(
            _Entry(item, protocol, _Callback(on_done), now, now + self._settings.commit_timeout_s)
        )
        return True

    def _has_room(self, item: DevicePoints) -> bool:
        """Whether the points fit in the queue now (an empty queue takes any message)."""
        if self._closing:
            raise StorageUnavailable("platform is shutting down")
        queued = self._queued_points
        return queued + len(item.points) <= self._settings.queue_max_points or not queued

    async def submit(self, item: DevicePoints, protocol: str) -> None:
        """Queue points and wait until they are committed.

        Raises `StorageUnavailable` when they could not be committed within the commit
        timeout (the device should retry; points already being written may still land,
        and rewriting the same (device, key, ts) keeps one row).
        """
        count = len(item.points)
        if count == 0:
            return
        future = self.try_enqueue(item, protocol)
        if future is None:
            future = await self._enqueue_when_space(item, protocol)
        await future

    def _enqueue(
        self, item: DevicePoints, protocol: str, now: float, deadline: float
    ) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._append(_Entry(item, protocol, future, now, deadline))
        return future

    def _append(self, entry: _Entry) -> None:
        count = len(entry.item.points)
        self._entries.append(entry)
        self._queued_points += count
        self._waiting_points += count
        if self._waiting_points >= self._wake_at and not self._work.is_set():
            self._work.set()

    async def _enqueue_when_space(self, item: DevicePoints, protocol: str) -> asyncio.Future[None]:
        """Wait (bounded by the commit timeout) until the points fit in the queue."""
        count = len(item.points)
        limit = self._settings.queue_max_points
        started = time.monotonic()
        deadline = started + self._settings.commit_timeout_s
        while self._queued_points + count > limit and self._queued_points > 0:
            if self._closing:
                raise StorageUnavailable("platform is shutting down")
            remaining = deadline - time.monotonic()
            self._space.clear()
            try:
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):  # not wait_for: see cancel_and_wait
                    await self._space.wait()
            except TimeoutError:
                raise StorageUnavailable(
                    "ingest queue is full: storage is not keeping up, retry later"
                ) from None
        if self._closing:
            raise StorageUnavailable("platform is shutting down")
        future = self._enqueue(item, protocol, started, deadline)
        heapq.heappush(self._late, (deadline, next(self._late_seq), self._entries[-1]))
        return future

    def _freed(self, points: int) -> None:
        """Points left the queue (committed, refused or withdrawn): wake waiting producers."""
        self._queued_points -= points
        if not self._space.is_set():
            self._space.set()

    # --- commit timeout ------------------------------------------------------------------
    async def _sweep(self) -> None:
        """Fail senders whose points are not committed by their deadline."""
        timeout = self._settings.commit_timeout_s
        while True:
            now = time.monotonic()
            next_deadline = self._expire(now)
            # A message queued after this point has a deadline at least `timeout` away.
            wake = min(next_deadline, now + timeout)
            await asyncio.sleep(max(wake - now, 0.001))

    def _expire(self, now: float) -> float:
        """Fail what is overdue; returns the next deadline to watch (inf if none)."""
        error = StorageUnavailable(f"storage unavailable: {self.last_error or 'commit timed out'}")
        withdrawn = 0
        entries = self._entries
        while entries and entries[0].deadline <= now:
            # Not yet handed to the store: withdraw it so a retry is the only copy.
            entry = entries.popleft()
            withdrawn += self._fail_queued(entry, error)
        late = self._late
        while late and late[0][0] <= now:
            entry = heapq.heappop(late)[2]
            if entry.taken:
                if not entry.future.done():
                    entry.future.set_exception(error)
            elif not entry.future.done():
                with contextlib.suppress(ValueError):
                    entries.remove(entry)
                    withdrawn += self._fail_queued(entry, error)
        if withdrawn:
            self._waiting_points -= withdrawn
            self._freed(withdrawn)
        next_deadline = math.inf
        for flight in self._in_flight:
            if flight.deadline <= now:
                flight.deadline = math.inf
                for entry in flight.batch:
                    if entry.future.done():
                        continue
                    if entry.deadline <= now:
                        entry.future.set_exception(error)
                    else:
                        flight.deadline = min(flight.deadline, entry.deadline)
            next_deadline = min(next_deadline, flight.deadline)
        if entries:
            next_deadline = min(next_deadline, entries[0].deadline)
        if late:
            next_deadline = min(next_deadline, late[0][0])
        return next_deadline

    @staticmethod
    def _fail_queued(entry: _Entry, error: StorageUnavailable) -> int:
        if not entry.future.done():
            entry.future.set_exception(error)
        return len(entry.item.points)

    # --- writing -------------------------------------------------------------------------
    async def _next_batch(self) -> _InFlight | None:
        """Wait for queued points (and, with a delay, a fuller batch); take one batch."""
        settings = self._settings
        max_points = settings.max_batch_points
        # While another batch is being written, wait for a full one: extra writers are for
        # a queue that outgrows one batch at a time. Taking every few messages at once
        # instead made many tiny transactions, each with its round trips and commit.
        while not self._entries or (
            self._writing and self._waiting_points < max_points and not self._closing
        ):
            if self._closing and not self._entries:
                return None
            self._wake_at = max_points if self._writing else 1
            self._work.clear()
            await self._work.wait()
        if settings.max_delay_s > 0:
            self._wake_at = max_points
            while self._waiting_points < max_points and not self._closing and self._entries:
                remaining = self._entries[0].enqueued + settings.max_delay_s - time.monotonic()
                if remaining <= 0:
                    break
                self._work.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):  # not wait_for: see cancel_and_wait
                        await self._work.wait()
        self._wake_at = max_points  # writing: wake another writer for a full batch only
        batch: list[_Entry] = []
        items: list[DevicePoints] = []
        points = 0
        deadline = math.inf
        entries = self._entries
        while entries:
            entry = entries[0]
            size = len(entry.item.points)
            if batch and points + size > max_points:
                break
            entries.popleft()
            if entry.future.done():  # timed out or its sender gave up: not written
                self._waiting_points -= size
                self._freed(size)
                continue
            entry.taken = True
            batch.append(entry)
            items.append(entry.item)
            points += size
            deadline = min(deadline, entry.deadline)
        self._waiting_points -= points
        return _InFlight(batch, items, points, deadline) if batch else None
