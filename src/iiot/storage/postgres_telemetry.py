"""Telemetry on PostgreSQL: batch writes (COPY), range and aggregate reads, retention.

`PostgresTelemetry` holds the telemetry methods of `PostgresStore`; the store supplies the
pooled connections (`_run`) and the device scope check (`_scoped_device`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from uuid import UUID

import asyncpg

from iiot.errors import InvalidPayload, NotFound, StorageUnavailable
from iiot.model import Device, DevicePoints, Point, Scalar
from iiot.storage import _common, pg_latest
from iiot.storage.base import Scope, TelemetryQuery
from iiot.storage.postgres_partitions import drop_expired_partitions, ensure_partitions
from iiot.storage.postgres_purge import purge_devices, queued_purges
from iiot.storage.read_limits import check_response_size

__all__ = ["PG_CURRENT_LATEST", "PostgresTelemetry", "lock_out_writers"]

log = logging.getLogger("iiot.storage.postgres")
T = TypeVar("T")

PARTITION_CHECK_S = 3600.0  # how often partitions are made ahead (they cover weeks)

_VALUE_COLS = "num_value, int_value, bool_value, str_value"
_STAGE_DDL = """
CREATE TEMPORARY TABLE IF NOT EXISTS telemetry_stage (
    device_id uuid NOT NULL, key text NOT NULL, ts bigint NOT NULL,
    num_value double precision, int_value bigint, bool_value boolean, str_value text
) ON COMMIT DELETE ROWS
"""
_STAGE_COLUMNS = ("device_id", "key", "ts", "num_value", "int_value", "bool_value", "str_value")
# Sorted by the primary key: every writer takes row locks in the same order (no deadlock
# between overlapping batches) and the b-tree is filled left to right.
_MERGE_TELEMETRY = f"""
INSERT INTO telemetry AS t (device_id, key, ts, {_VALUE_COLS})
SELECT device_id, key, ts, {_VALUE_COLS} FROM telemetry_stage ORDER BY device_id, key, ts
ON CONFLICT (device_id, key, ts) DO UPDATE
SET num_value = EXCLUDED.num_value, int_value = EXCLUDED.int_value,
    bool_value = EXCLUDED.bool_value, str_value = EXCLUDED.str_value
WHERE (t.num_value, t.int_value, t.bool_value, t.str_value)
      IS DISTINCT FROM (EXCLUDED.num_value, EXCLUDED.int_value, EXCLUDED.bool_value,
                        EXCLUDED.str_value)
"""
# Taken shared by every telemetry batch and exclusively by whatever deletes devices.
_DEVICES_LOCK = 0x1107_DE71
# The lock, then the count of device deletions so far (migration 0003). In this order in
# one statement (CASE evaluates its condition first): a deletion bumps the count while it
# holds the lock exclusively, so a count read under the shared lock is current until the
# transaction ends.
_LOCK_AND_DELETIONS = (
    "SELECT CASE WHEN pg_advisory_xact_lock_shared($1) IS NULL THEN NULL"
    " ELSE coalesce(pg_sequence_last_value('device_deletions'), 0) END"
)

_AGG_SQL = {
    "avg": "avg(num)",
    "min": "min(num)",
    "max": "max(num)",
    "sum": "sum(num)",
    "count": "count(*)",
}
# The latest values of a device: no row means the device is not visible, one row of NULLs
# a device without data. telemetry_latest may lag behind the stored points by one refresh
# (pg_latest), so each key's row is checked against the newest point at or after it: one
# index probe, which finds the row's own point when the row is current.
_LATEST_SQL = f"""
SELECT l.key, l.ts, l.num_value, l.int_value, l.bool_value, l.str_value,
       n.ts, n.num_value, n.int_value, n.bool_value, n.str_value
FROM devices d
LEFT JOIN telemetry_latest l ON l.device_id = d.id AND ($3::text[] IS NULL OR l.key = ANY($3))
LEFT JOIN LATERAL (
    SELECT t.ts, {_VALUE_COLS} FROM telemetry t
    WHERE t.device_id = l.device_id AND t.key = l.key AND t.ts >= l.ts
    ORDER BY t.ts DESC LIMIT 1
) AS n ON true
WHERE d.id = $1 AND ($2::uuid IS NULL OR d.tenant_id = $2)
ORDER BY l.key
"""
# Every row of telemetry_latest as readers see it (the same check as _LATEST_SQL), for
# backups.
PG_CURRENT_LATEST = f"""
SELECT l.device_id, l.key, coalesce(n.ts, l.ts),
       CASE WHEN n.ts IS NULL THEN l.num_value ELSE n.num_value END,
       CASE WHEN n.ts IS NULL THEN l.int_value ELSE n.int_value END,
       CASE WHEN n.ts IS NULL THEN l.bool_value ELSE n.bool_value END,
       CASE WHEN n.ts IS NULL THEN l.str_value ELSE n.str_value END
FROM telemetry_latest l
LEFT JOIN LATERAL (
    SELECT t.ts, {_VALUE_COLS} FROM telemetry t
    WHERE t.device_id = l.device_id AND t.key = l.key AND t.ts >= l.ts
    ORDER BY t.ts DESC LIMIT 1
) AS n ON true
"""
# Telemetry reads. $1 device, $2 scope, $3 keys (NULL: every key the device has, which all
# have a row in telemetry_latest), $4 start, $5 end, $6 limit per key. The device's scope
# is checked in the same statement: no row at all means the device is not visible.
# Each key is one range scan of the (device_id, key, ts) primary key.
_QUERY_KEYS = (
    "coalesce($3::text[], ARRAY(SELECT key FROM telemetry_latest WHERE device_id = $1"
    " ORDER BY key))"
)
# The lateral part reads only what the telemetry key holds (migration 0002), so a range is
# an index-only scan; str_value, outside the key, is fetched per point for string points only.
_RAW_SQL = (
    "SELECT k.key, t.ts, t.num_value, t.int_value, t.bool_value,"
    " CASE WHEN t.ts IS NOT NULL AND num_nonnulls(t.num_value, t.int_value, t.bool_value) = 0"
    "  THEN (SELECT s.str_value FROM telemetry s"
    "        WHERE s.device_id = $1 AND s.key = k.key AND s.ts = t.ts) END"
    " FROM devices d"
    f" LEFT JOIN LATERAL unnest({_QUERY_KEYS}) WITH ORDINALITY AS k(key, n) ON true"
    " LEFT JOIN LATERAL (SELECT ts, num_value, int_value, bool_value"
    "  FROM telemetry WHERE device_id = $1 AND key = k.key AND ts >= $4 AND ts < $5"
    "  ORDER BY ts {direction} LIMIT $6) AS t ON true"
    " WHERE d.id = $1 AND ($2::uuid IS NULL OR d.tenant_id = $2)"
    " ORDER BY k.n, t.ts {direction}"
)
# Every key of a visible device (a row of NULL when it has none; no row: not visible).
_DEVICE_KEYS_SQL = (
    "SELECT l.key FROM devices d LEFT JOIN telemetry_latest l ON l.device_id = d.id"
    " WHERE d.id = $1 AND ($2::uuid IS NULL OR d.tenant_id = $2) ORDER BY l.key"
)
# $7: the interval. Buckets are floor(ts / interval) * interval, also for negative ts.
_AGG_QUERY = f"""
WITH p AS (
    SELECT key, ts - ((ts % $7) + $7) % $7 AS bucket,
           coalesce(num_value, int_value::double precision) AS num
    FROM telemetry
    WHERE device_id = $1 AND key = ANY({_QUERY_KEYS}) AND ts >= $4 AND ts < $5
), g AS (
    SELECT key, bucket, {{agg}} AS value FROM p GROUP BY key, bucket
), r AS (
    SELECT key, bucket, value,
           row_number() OVER (PARTITION BY key ORDER BY bucket {{direction}}) AS n
    FROM g WHERE value IS NOT NULL
)
SELECT r.key, r.bucket, r.value
FROM devices d LEFT JOIN r ON r.n <= $6
WHERE d.id = $1 AND ($2::uuid IS NULL OR d.tenant_id = $2)
ORDER BY r.key, r.bucket {{direction}}
"""
# The same when the limit cannot cut anything (it is at least the number of buckets in the
# range, as for a dashboard chart): no numbering of the buckets. $6: the interval.
_AGG_ALL_QUERY = f"""
WITH p AS (
    SELECT key, ts - ((ts % $6) + $6) % $6 AS bucket,
           coalesce(num_value, int_value::double precision) AS num
    FROM telemetry
    WHERE device_id = $1 AND key = ANY({_QUERY_KEYS}) AND ts >= $4 AND ts < $5
), g AS (
    SELECT key, bucket, {{agg}} AS value FROM p GROUP BY key, bucket
)
SELECT g.key, g.bucket, g.value
FROM devices d LEFT JOIN g ON g.value IS NOT NULL
WHERE d.id = $1 AND ($2::uuid IS NULL OR d.tenant_id = $2)
ORDER BY g.key, g.bucket {{direction}}
"""


async def _init_connection(conn: Any) -> None:
    """Give each new pooled connection its own staging table (temporary: no WAL, no bloat)."""
    await conn.execute(_STAGE_DDL)


async def lock_out_writers(conn: Any) -> None:
    """In a transaction about to delete devices: wait for batches in flight, hold off
    later ones until commit, and make every writer check its devices again."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _DEVICES_LOCK)
    await conn.execute("SELECT nextval('device_deletions')")


def _value(row: Any) -> Scalar:
    return _common.value_from_columns(
        row["num_value"], row["int_value"], row["bool_value"], row["str_value"]
    )


def _scalar(num: Any, integer: Any, boolean: Any, text: Any) -> Scalar:
    # `_common.value_from_columns` inlined for the hot read paths (thousands of rows).
    if num is not None:
        return float(num)
    if integer is not None:
        return int(integer)
    if boolean is not None:
        return bool(boolean)
    if text is not None:
        return str(text)
    raise ValueError("telemetry row without a value")


def _raw_result(rows: Sequence[Any]) -> dict[str, list[tuple[int, Scalar]]]:
    """Rows of `_RAW_SQL` (key, ts, value columns), ordered, as (ts, value) lists per key."""
    result: dict[str, list[tuple[int, Scalar]]] = {}
    current: str | None = None
    points: list[tuple[int, Scalar]] = []
    for key, ts, num, integer, boolean, text in rows:
        if ts is None:  # a key without data in the range
            continue
        if key != current:
            current = key
            points = result.setdefault(key, [])
        if num is not None:
            points.append((ts, num))  # asyncpg decodes float8 to float already
        else:
            points.append((ts, _scalar(num, integer, boolean, text)))
    return result


def _forget(tasks: list[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    """A done callback taking a finished task off `tasks`."""

    def forget(task: asyncio.Task[None]) -> None:
        if task in tasks:
            tasks.remove(task)

    return forget


class PostgresTelemetry:
    """The telemetry methods of `PostgresStore` (a mixin: the store provides `_run`)."""

    _latest: pg_latest.LatestRefresher
    _alive: set[UUID]
    _deletions_seen: int | None
    _background: list[asyncio.Task[None]]

    async def _run(
        self,
        op: Callable[[Any], Awaitable[T]],
        *,
        retry: bool = True,
        read: bool = False,
        ingest: bool = False,
    ) -> T:
        raise NotImplementedError

    # --- background work: purges of deleted devices ------------------------------------
    async def _start_background(self) -> None:
        """Make this and the coming weeks' partitions, then start what runs beside the
        store: finishing purges cut short earlier, and making partitions ahead hourly."""
        await ensure_partitions(self._run)
        self._background = [
            asyncio.create_task(self._resume_purges(), name="iiot-pg-purge"),
            asyncio.create_task(self._keep_partitions_ahead(), name="iiot-pg-partitions"),
        ]

    async def _keep_partitions_ahead(self) -> None:
        while True:
            await asyncio.sleep(PARTITION_CHECK_S)
            try:
                await ensure_partitions(self._run)
            except StorageUnavailable as exc:
                log.warning("cannot make telemetry partitions now, retrying later: %s", exc)

    async def _stop_background(self) -> None:
        tasks = list(getattr(self, "_background", []))  # callbacks edit the list
        self._background = []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _resume_purges(self) -> None:
        try:
            await purge_devices(self._run, await queued_purges(self._run))
        except StorageUnavailable as exc:
            log.warning("purging deleted devices' telemetry stopped, next start resumes: %s", exc)

    async def _purge(self, device_ids: Sequence[UUID]) -> None:
        """Purge deleted devices' points and wait for it. The purge goes on if the caller
        is cancelled (a client hanging up), until the store closes; the next start resumes."""
        task = asyncio.create_task(self._purge_now(device_ids), name="iiot-pg-purge")
        self._background.append(task)
        task.add_done_callback(_forget(self._background))
        await asyncio.shield(task)

    async def _purge_now(self, device_ids: Sequence[UUID]) -> None:
        await purge_devices(self._run, device_ids)

    async def wait_for_purges(self) -> None:
        """Wait until purges resumed at start are done (for tools and tests)."""
        for task in list(getattr(self, "_background", [])):
            if task.get_name() == "iiot-pg-purge":
                await asyncio.shield(task)

    @staticmethod
    async def _scoped_device(conn: Any, scope: Scope, device_id: UUID) -> Device:
        raise NotImplementedError

    # --- telemetry ---------------------------------------------------------------------
    async def write_points(self, batch: Sequence[DevicePoints]) -> None:
        """Store points in one transaction; latest values follow (see `pg_latest`).

        Idempotent: a (device, key, ts) already stored keeps one row (the newer value wins).
        Points of devices deleted meanwhile are skipped (logged), so that the rest of the
        batch commits and a pipeline never retries a batch forever. Raises
        `StorageUnavailable` when the database cannot be reached; then nothing of the batch
        is committed and the caller may retry it whole.
        """
        # `newest` holds only series without a latest-value row yet (see pg_latest).
        rows = _common.batch_rows(batch, self._latest.known)
        if not rows.rows:
            return

        async def op(conn: Any) -> _common.BatchRows:
            # Almost every batch holds only new points, and a COPY straight into the table
            # is the fastest way in. A batch that repeats stored points (a retry, a device
            # resending) makes that COPY fail on the primary key; the transaction is then
            # run again the general way: COPY into the staging table, INSERT ... ON
            # CONFLICT. (A savepoint instead would stamp every row with a subtransaction.)
            try:
                return await self._write_transaction(conn, rows, merge=False)
            except (asyncpg.UniqueViolationError, asyncpg.exceptions.DeadlockDetectedError):
                return await self._write_transaction(conn, rows, merge=True)

        # Idempotent by design, so a broken idle connection is retried at once.
        try:
            written = await self._run(op, ingest=True)
        except asyncpg.DataError as exc:
            # A value PostgreSQL cannot hold: refused for good (the pipeline then finds
            # the message that carries it and refuses only that one).
            raise InvalidPayload(f"the database refused a value: {exc}") from None
        self._latest.committed(written.device_ids, written.newest)

    async def _write_transaction(
        self, conn: Any, rows: _common.BatchRows, *, merge: bool
    ) -> _common.BatchRows:
        """One transaction storing the rows of live devices and the rows of new series.

        Returns what was written (`newest`: the new series, inserted into telemetry_latest).
        """
        async with conn.transaction():
            # No foreign key per row: batches share one advisory lock that device deletes
            # take exclusively, so a delete waits for batches in flight and later batches
            # find the device gone. Devices seen alive since the last deletion anywhere
            # need no check (a deletion bumps the count read here).
            deletions = await conn.fetchval(_LOCK_AND_DELETIONS, _DEVICES_LOCK)
            if deletions != self._deletions_seen:
                self._alive.clear()
                self._latest.forget_series()
                self._deletions_seen = deletions
                # Rows of series thought known may be gone too (a forced restore): this
                # batch registers all of its series again.
                rows = rows.with_every_series()
            alive = self._alive
            unchecked = [d for d in rows.device_ids if d not in alive]
            if unchecked:
                found = await conn.fetch(
                    "SELECT id FROM devices WHERE id = ANY($1::uuid[])", unchecked
                )
                alive.update(r["id"] for r in found)
                if len(found) != len(unchecked):
                    kept = rows.without(alive)
                    log.warning(
                        "skipped %d points of %d deleted device(s)",
                        len(rows.rows) - len(kept.rows),
                        len(unchecked) - len(found),
                    )
                    rows = kept
                    if not rows.rows:
                        return rows
            if merge:
                await conn.copy_records_to_table(
                    "telemetry_stage",
                    records=_common.dedup_rows(rows.rows),
                    columns=_STAGE_COLUMNS,
                )
                await conn.execute(_MERGE_TELEMETRY)
            else:
                await conn.copy_records_to_table(
                    "telemetry", records=rows.rows, columns=_STAGE_COLUMNS
                )
            if rows.newest:
                await conn.execute(pg_latest.MERGE_LATEST, *pg_latest.as_columns(rows.newest))
            return rows

    async def query_telemetry(
        self, scope: Scope, device_id: UUID, query: TelemetryQuery
    ) -> dict[str, list[tuple[int, Scalar]]]:
        """Raw points or aggregates per key, as (ts, value) pairs in the query's order.

        Only keys with data in [start, end) appear. Aggregates are computed per bucket
        `floor(ts / interval) * interval`; avg/min/max/sum use numbers only (booleans and
        strings are skipped, and a bucket without numbers is left out); count counts every
        point. Numeric aggregates are floats, counts ints.
        """
        _common.check_query(query)
        direction = "DESC" if query.order == "desc" else "ASC"
        keys = None if query.keys is None else list(dict.fromkeys(query.keys))

        if keys is not None:
            check_response_size(query, len(keys))

        async def op(conn: Any) -> dict[str, list[tuple[int, Scalar]]]:
            if keys == [] or query.end <= query.start or query.limit == 0:
                await self._scoped_device(conn, scope, device_id)
                return {}
            base = params
            if keys is None and query.max_points is not None:
                # The cap counts every key of the device: read them first (scope included).
                found = await conn.fetch(_DEVICE_KEYS_SQL, device_id, scope)
                if not found:
                    raise NotFound(f"device {device_id} not found")
                every = [r["key"] for r in found if r["key"] is not None]
                check_response_size(query, len(every))
                base = (device_id, scope, every, *params[3:])
            # One statement checks the device's scope and reads the data (one round trip).
            # It answers no row when the device is not visible, and a row of NULLs per key
            # (raw) or one (aggregates) when there is no data.
            if query.agg == "none":
                rows = await conn.fetch(_RAW_SQL.format(direction=direction), *base)
                if not rows:
                    raise NotFound(f"device {device_id} not found")
                return _raw_result(rows)
            first = query.start - query.start % query.interval_ms
            args: tuple[Any, ...]
            if query.limit >= (query.end - 1 - first) // query.interval_ms + 1:
                sql, args = _AGG_ALL_QUERY, (*base[:5], query.interval_ms)
            else:
                sql, args = _AGG_QUERY, (*base, query.interval_ms)
            sql = sql.format(agg=_AGG_SQL[query.agg], direction=direction)
            rows = await conn.fetch(sql, *args)
            if not rows:
                raise NotFound(f"device {device_id} not found")
            result: dict[str, list[tuple[int, Scalar]]] = {}
            cast: Callable[[Any], Scalar] = int if query.agg == "count" else float
            for key, bucket, value in rows:
                if key is not None:
                    result.setdefault(key, []).append((bucket, cast(value)))
            return result

        params = (device_id, scope, keys, query.start, query.end, query.limit)
        return await self._run(op, read=True)

    async def latest(
        self, scope: Scope, device_id: UUID, keys: Sequence[str] | None = None
    ) -> dict[str, Point]:
        """The newest point (largest ts) of each key of a device."""

        async def op(conn: Any) -> dict[str, Point]:
            # The scope check and the read in one statement: no row means no visible device,
            # one row of NULLs a device without data.
            rows = await conn.fetch(_LATEST_SQL, device_id, scope, keys_filter)
            if not rows:
                raise NotFound(f"device {device_id} not found")
            latest: dict[str, Point] = {}
            for key, ts, num, integer, boolean, text, *stored in rows:
                if key is None:
                    continue
                if stored[0] is not None:  # a stored point at or after the row's ts wins
                    ts, num, integer, boolean, text = stored
                latest[key] = Point(key, ts, _scalar(num, integer, boolean, text))
            return latest

        keys_filter = None if keys is None else list(keys)
        return await self._run(op, read=True)

    async def delete_telemetry_before(self, tenant_id: UUID, before_ts: int) -> int:
        """Delete a tenant's raw telemetry older than `before_ts`; returns rows removed.

        Works in small batches, each its own short transaction, one (device, key) range of
        the primary key at a time: ingestion and readers never wait long behind it, and a
        crash midway leaves only committed batches (running it again finishes the job).
        """
        batch = 5000  # rows per transaction: a few tens of ms of row locks at most

        async def series(conn: Any) -> list[tuple[UUID, str]]:
            # Every key ever written has a latest row (kept by retention): the index ranges.
            rows = await conn.fetch(
                "SELECT l.device_id, l.key FROM telemetry_latest l"
                " JOIN devices d ON d.id = l.device_id WHERE d.tenant_id = $1"
                " ORDER BY l.device_id, l.key",
                tenant_id,
            )
            return [(r["device_id"], r["key"]) for r in rows]

        # Whole weeks past the cutoff go at once where they can (postgres_partitions).
        removed = await drop_expired_partitions(self._run, tenant_id, before_ts)
        for device_id, key in await self._run(series):
            while True:

                async def chunk(conn: Any, device_id: UUID = device_id, key: str = key) -> int:
                    # The batch ends at the batch-th oldest expired point (ts is unique
                    # within a series), so each DELETE is one bounded index range.
                    status = await conn.execute(
                        "DELETE FROM telemetry WHERE device_id = $1 AND key = $2 AND ts <"
                        " coalesce((SELECT ts + 1 FROM telemetry WHERE device_id = $1"
                        "  AND key = $2 AND ts < $3 ORDER BY ts OFFSET $4 - 1 LIMIT 1), $3)",
                        device_id,
                        key,
                        before_ts,
                        batch,
                    )
                    return int(status.rsplit(" ", 1)[1])

                deleted = await self._run(chunk)
                removed += deleted
                if deleted < batch:
                    break
        return removed
