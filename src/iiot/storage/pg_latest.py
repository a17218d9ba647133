"""Latest values on PostgreSQL: new series in the write, values refreshed after commit.

Updating `telemetry_latest` in every telemetry transaction cost as much as the COPY of
the points themselves (3,000 row updates per 5,000-point batch from 1,000 devices). So
the write transaction only inserts the rows of series it has not seen yet, and one
background task brings the rows of every device written since its last run up to date
from the stored points themselves (under load, one refresh per second however many
batches arrived). The write path keeps no per-point bookkeeping for it: only the
devices of each batch.

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
# probes per row do not grow. SET LOCAL ends with the transaction.
_PLAN = "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off"
# Every row of the given devices brought up to date from the stored points: per row one
# backward probe of the telemetry key for the newest point at or after the row's ts (the
# row's own point when it is current). Only rows that change are written. Rows of devices
# deleted meanwhile are gone and so left alone.
_REFRESH_LATEST = f"""
WITH newest AS (
    SELECT l.device_id, l.key, n.ts, n.num_value, n.int_value, n.bool_value, n.str_value
    FROM telemetry_latest l
    CROSS JOIN LATERAL (
        SELECT t.ts, {_VALUE_COLS} FROM telemetry t
        WHERE t.device_id = l.device_id AND t.key = l.key AND t.ts >= l.ts
        ORDER BY t.ts DESC LIMIT 1
    ) AS n
    WHERE l.device_id = ANY($1::uuid[])
)
UPDATE telemetry_latest AS l
SET ts = n.ts, num_value = n.num_value, int_value = n.int_value,
    bool_value = n.bool_value, str_value = n.str_value
FROM newest n
WHERE l.device_id = n.device_id AND l.key = n.key
  AND (n.ts > l.ts OR (l.num_value, l.int_value, l.bool_value, l.str_value)
       IS DISTINCT FROM (n.num_value, n.int_value, n.bool_value, n.str_value))
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

# Runs `op(connection)` on a pooled connection (PostgresStore._run).
Runner = Callable[[Callable[[Any], Awaitable[None]]], Awaitable[None]]


def as_columns(rows: Sequence[Row]) -> list[list[Any]]:
    """Rows as the seven column arrays MERGE_LATEST takes."""
    return [list(c) for c in zip(*rows, strict=True)]


class LatestRefresher:
    """Knows which series have a row; refreshes the rows of devices written to."""

    # Devices whose known keys are kept in memory; past this many the map starts over
    # (a forgotten series costs one more upsert, not a wrong answer).
    MAX_KNOWN_DEVICES = 500_000

    def __init__(self, run: Runner, interval_s: float = 1.0) -> None:
        self._run = run
        self._interval_s = interval_s
        self.known: dict[UUID, set[str]] = {}  # device -> keys that have a row
        self._pending: set[UUID] = set()  # devices written to since the last refresh
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def committed(self, device_ids: Sequence[UUID], new_series: Sequence[Row]) -> None:
        """A batch committed: remember its new series and refresh its devices' rows."""
        known = self.known
        if new_series:
            if len(known) > self.MAX_KNOWN_DEVICES:
                known.clear()
            for row in new_series:
                keys = known.get(row[0])
                if keys is None:
                    keys = known[row[0]] = set()
                keys.add(row[1])
        self._pending.update(device_ids)
        if not self._wake.is_set():
            self._wake.set()

    def forget_series(self) -> None:
        """Devices were deleted (or the tables replaced): look series up again."""
        self.known.clear()

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
        devices, self._pending = self._pending, set()
        if not devices:
            return
        ordered = sorted(devices)

        async def op(conn: Any) -> None:
            async with conn.transaction():
                await conn.execute(_PLAN)
                await conn.execute(_REFRESH_LATEST, ordered)

        try:
            await self._run(op)
        except BaseException:
            self._pending |= devices  # not refreshed: again next time
            raise
