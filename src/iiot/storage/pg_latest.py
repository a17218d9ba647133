"""Latest values on PostgreSQL: new series in the write, values refreshed after commit.

Updating `telemetry_latest` in every telemetry transaction cost as much as the COPY of
the points themselves (3,000 row updates per 5,000-point batch from 1,000 devices). So
the write transaction only inserts the rows of series it has not seen yet, and the
newest value of each series is written later by one background task that merges every
batch committed in the meantime (under load, one refresh per second however many
batches arrived).

Readers never see a stale value: `PostgresStore.latest` takes, per key, the newer of the
`telemetry_latest` row and the newest stored point at or after it (one index probe). So
neither a refresh in progress nor a crash before the refresh changes what users read;
the refresh only keeps that probe short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from uuid import UUID

from iiot.errors import StorageUnavailable
from iiot.storage._common import Row
from iiot.supervisor import Backoff, cancel_and_wait

__all__ = ["MERGE_LATEST", "LatestRefresher"]

log = logging.getLogger(__name__)

_VALUE_COLS = "num_value, int_value, bool_value, str_value"
# With many series the planner hashes the whole telemetry_latest table for every update
# (measured: 31 ms per 3,000 rows at 100,000 series, growing with the table); index
# probes per updated row do not grow. SET LOCAL ends with the transaction.
_PLAN = "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off"
# The newest point per (device, key), sent as arrays. A plain UPDATE: the rows exist
# (their series were inserted with the points), and ON CONFLICT DO UPDATE would also
# write a row lock for every row. An older point never replaces a newer value; the same
# ts replaces it (a rewrite of that point). Series of devices deleted meanwhile have no
# row and are left alone.
_UPDATE_LATEST = f"""
UPDATE telemetry_latest AS l
SET ts = u.ts, num_value = u.num_value, int_value = u.int_value,
    bool_value = u.bool_value, str_value = u.str_value
FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::double precision[],
            $5::bigint[], $6::boolean[], $7::text[])
     AS u(device_id, key, ts, {_VALUE_COLS})
WHERE l.device_id = u.device_id AND l.key = u.key AND u.ts >= l.ts
"""
# Series first seen in a batch: inserted in the telemetry transaction itself, so that
# every key a device has always has a row (readers list a device's keys from here).
# Sorted, so that concurrent batches take row locks in the same order.
MERGE_LATEST = f"""
INSERT INTO telemetry_latest AS l (device_id, key, ts, {_VALUE_COLS})
SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::double precision[],
                     $5::bigint[], $6::boolean[], $7::text[])
ORDER BY 1, 2
ON CONFLICT (device_id, key) DO UPDATE
SET ts = EXCLUDED.ts, num_value = EXCLUDED.num_value, int_value = EXCLUDED.int_value,
    bool_value = EXCLUDED.bool_value, str_value = EXCLUDED.str_value
WHERE EXCLUDED.ts > l.ts OR (EXCLUDED.ts = l.ts AND
      (l.num_value, l.int_value, l.bool_value, l.str_value)
      IS DISTINCT FROM (EXCLUDED.num_value, EXCLUDED.int_value, EXCLUDED.bool_value,
                        EXCLUDED.str_value))
"""

Series = tuple[UUID, str]
# Runs `op(connection)` on a pooled connection (PostgresStore._run).
Runner = Callable[[Callable[[Any], Awaitable[None]]], Awaitable[None]]


def as_columns(rows: Sequence[Row]) -> list[list[Any]]:
    """Rows as the seven column arrays the statements above take."""
    return [list(c) for c in zip(*rows, strict=True)]


class LatestRefresher:
    """Knows which series have a row; writes the newest values of committed batches."""

    # The series known to have a row are kept in memory; past this many the set starts
    # over (a forgotten series costs one more upsert, not a wrong answer).
    MAX_KNOWN = 2_000_000

    def __init__(self, run: Runner, interval_s: float = 1.0) -> None:
        self._run = run
        self._interval_s = interval_s
        self._known: set[Series] = set()
        self._pending: dict[Series, Row] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def new_series(self, newest: Sequence[Row]) -> list[Row]:
        """The rows of `newest` whose series may have no row yet (insert them with the batch)."""
        known = self._known
        return [row for row in newest if (row[0], row[1]) not in known]

    def committed(self, newest: Sequence[Row], inserted: Sequence[Row]) -> None:
        """A batch committed: remember its new series and queue its newest values."""
        known = self._known
        if len(known) + len(inserted) > self.MAX_KNOWN:
            known.clear()
        known.update((row[0], row[1]) for row in inserted)
        pending = self._pending
        for row in newest:
            series = (row[0], row[1])
            seen = pending.get(series)
            if seen is None or row[2] >= seen[2]:
                pending[series] = row
        if pending and not self._wake.is_set():
            self._wake.set()

    def forget_series(self) -> None:
        """Devices were deleted: their series lost their rows."""
        self._known.clear()

    def start(self) -> None:
        """Start the background refresh."""
        if self._task is None:
            self._task = asyncio.create_task(self._refresh_forever(), name="pg-latest-refresh")

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop, after one last refresh so the table is current at rest."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        if self._pending:
            with contextlib.suppress(StorageUnavailable, TimeoutError):
                await asyncio.wait_for(self._refresh(), timeout_s)

    async def _refresh_forever(self) -> None:
        backoff = Backoff()
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._refresh()
            except StorageUnavailable as exc:
                log.debug("latest values not refreshed yet: %s", exc)
                await asyncio.sleep(backoff.next_delay())
                self._wake.set()
                continue
            backoff.reset()
            # Let batches gather: one refresh per interval however many commit.
            await asyncio.sleep(self._interval_s)

    async def _refresh(self) -> None:
        rows, self._pending = self._pending, {}
        if not rows:
            return
        # Sorted, so that concurrent refreshes (other processes) lock rows in one order.
        ordered = sorted(rows.values(), key=lambda r: (r[0], r[1]))

        async def op(conn: Any) -> None:
            async with conn.transaction():
                await conn.execute(_PLAN)
                await conn.execute(_UPDATE_LATEST, *as_columns(ordered))

        try:
            await self._run(op)
        except BaseException:
            # Not written: put them back unless a newer value arrived meanwhile.
            for series, row in rows.items():
                newer = self._pending.get(series)
                if newer is None or newer[2] < row[2]:
                    self._pending[series] = row
            raise
