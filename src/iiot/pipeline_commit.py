"""The ingest pipeline's writer tasks: commit batches, isolate bad messages, tell senders.

A batch is retried while storage is unavailable; one refused for good is written in halves
until each bad message stands alone; senders hear of their batch in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from iiot.bus import LiveBus
from iiot.errors import IIoTError, StorageUnavailable
from iiot.metrics import Metrics
from iiot.model import DevicePoints
from iiot.pipeline_entries import PointWriter, _Entry, _InFlight
from iiot.supervisor import Backoff

__all__ = ["PipelineCommit"]

log = logging.getLogger("iiot.pipeline")  # the pipeline's logger, as before the split


class PipelineCommit:
    """The writing half of `Pipeline` (a mixin: the pipeline sets these attributes up)."""

    _writer: PointWriter
    _bus: LiveBus
    _metrics: Metrics
    _entries: deque[_Entry]
    _queued_points: int
    _in_flight: list[_InFlight]
    _writing: int
    _work: asyncio.Event
    _stored: dict[str, Any]
    _closing: bool
    storage_ok: bool
    last_error: str | None

    async def _next_batch(self) -> _InFlight | None:
        raise NotImplementedError

    def _freed(self, points: int) -> None:
        raise NotImplementedError

    async def _run(self) -> None:
        while True:
            flight = await self._next_batch()
            if flight is None:
                if self._closing and not self._entries:
                    self._work.set()  # let the other writers see it too
                    return
                continue
            self._in_flight.append(flight)
            self._metrics.queue_points.set(self._queued_points)
            self._writing += 1
            try:
                flight.error = await self._commit(flight.items, flight.points)
                if flight.error is not None and len(flight.items) > 1:
                    flight.errors = await self._isolate(flight.items, flight.error)
                    flight.error = None
            finally:
                self._writing -= 1
            flight.done = True
            self._release_written()
            if self._entries and not self._work.is_set():
                self._work.set()  # a writer waiting for a full batch may take what is queued

    def _release_written(self) -> None:
        """Tell senders of written batches, oldest batch first.

        With several writers a batch may commit before an older one; its senders still
        hear after the older batch's, so that acknowledgements keep the order of arrival
        (MQTT requires PUBACKs in the order of the PUBLISH packets).
        """
        flights = self._in_flight
        while flights and flights[0].done:
            flight = flights.pop(0)
            errors = flight.errors
            if errors is not None:
                self._finish_each(flight.batch, flight.points, errors)
                pairs = zip(flight.items, errors, strict=True)
                stored = [item for item, error in pairs if error is None]
                if stored:
                    self._bus.publish_points(stored)
                continue
            self._finish(flight.batch, flight.points, flight.error)
            if flight.error is None:
                self._bus.publish_points(flight.items)

    async def _commit(self, items: list[DevicePoints], points: int) -> BaseException | None:
        """Write a batch, retrying while storage is unavailable; the error if refused."""
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
                return exc
            except Exception:  # a store bug must not kill the writer and stall all ingestion
                log.exception("batch of %d points failed unexpectedly; senders must retry", points)
                return StorageUnavailable("unexpected storage error")
            break
        if not self.storage_ok:
            log.warning("storage available again; writing resumed")
            self.storage_ok = True
            self.last_error = None
        self._metrics.write_seconds.observe(time.perf_counter() - started)
        self._metrics.batch_points.observe(points)
        return None

    async def _isolate(
        self, items: list[DevicePoints], error: BaseException
    ) -> list[BaseException | None]:
        """Write a refused batch in halves until each bad message stands alone.

        Only a refusal for good gets here (a database that is down is retried whole by
        `_commit`), so one bad message, e.g. a value the database cannot hold, no longer
        fails every other device's messages in its batch.
        """
        if len(items) == 1:
            return [error]
        middle = len(items) // 2
        outcomes: list[BaseException | None] = []
        for half in (items[:middle], items[middle:]):
            failed = await self._commit(half, sum(len(item.points) for item in half))
            if failed is None:
                outcomes.extend([None] * len(half))
            else:
                outcomes.extend(await self._isolate(half, failed))
        return outcomes

    def _finish_each(
        self, batch: list[_Entry], points: int, errors: list[BaseException | None]
    ) -> None:
        """Tell each sender of a split batch its own outcome."""
        per_protocol: dict[str, int] = {}
        for entry, error in zip(batch, errors, strict=True):
            future = entry.future
            if error is None:
                count = len(entry.item.points)
                per_protocol[entry.protocol] = per_protocol.get(entry.protocol, 0) + count
            if not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)
        for protocol, count in per_protocol.items():
            self._stored_counter(protocol).inc(count)
        self._freed(points)
        self._metrics.queue_points.set(self._queued_points)

    def _finish(self, batch: list[_Entry], points: int, error: BaseException | None) -> None:
        """Tell every sender of a batch its one outcome."""
        self._finish_each(batch, points, [error] * len(batch))

    def _stored_counter(self, protocol: str) -> Any:
        child = self._stored.get(protocol)
        if child is None:
            child = self._stored[protocol] = self._metrics.points_stored.labels(protocol)
        return child
