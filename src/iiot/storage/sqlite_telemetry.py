"""Telemetry on SQLite: batch writes, range and aggregate reads, latest values, retention.

`SqliteTelemetry` holds the telemetry methods of `SqliteStore`; the store supplies the
worker thread (`_call`), the connection (`_db`) and the device scope check (`_device_row`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from uuid import UUID

from iiot.errors import StorageUnavailable
from iiot.model import Device, DevicePoints, Point, Scalar
from iiot.storage import _common
from iiot.storage.base import Scope, TelemetryQuery
from iiot.storage.read_limits import check_response_size
from iiot.storage.sqlite_purge import finish_purge, purge_chunk, queued_purges
from iiot.storage.sqlite_sql import _CHUNK, _VALUE_COLS, SqlitePart, _placeholders, _transaction

__all__ = ["SqliteTelemetry"]

log = logging.getLogger("iiot.storage.sqlite")
T = TypeVar("T")

_UPSERT_TELEMETRY = f"""
INSERT INTO telemetry (device_id, key, ts, {_VALUE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (device_id, key, ts) DO UPDATE
SET num_value = excluded.num_value, int_value = excluded.int_value,
    bool_value = excluded.bool_value, str_value = excluded.str_value
WHERE (num_value, int_value, bool_value, str_value)
      IS NOT (excluded.num_value, excluded.int_value, excluded.bool_value, excluded.str_value)
"""
# A late (older) point never replaces a newer latest value; the same ts replaces it.
_UPSERT_LATEST = f"""
INSERT INTO telemetry_latest (device_id, key, ts, {_VALUE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (device_id, key) DO UPDATE
SET ts = excluded.ts, num_value = excluded.num_value, int_value = excluded.int_value,
    bool_value = excluded.bool_value, str_value = excluded.str_value
WHERE excluded.ts > telemetry_latest.ts OR (excluded.ts = telemetry_latest.ts AND
      (num_value, int_value, bool_value, str_value)
      IS NOT (excluded.num_value, excluded.int_value, excluded.bool_value, excluded.str_value))
"""
_AGG_SQL = {
    "avg": "avg(num)",
    "min": "min(num)",
    "max": "max(num)",
    "sum": "total(num)",  # total() is a float like avg; sum() of no rows is NULL anyway
    "count": "count(*)",
}


def _forget(tasks: list[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    """A done callback taking a finished task off `tasks`."""

    def forget(task: asyncio.Task[None]) -> None:
        if task in tasks:
            tasks.remove(task)

    return forget


class SqliteTelemetry(SqlitePart):
    """The telemetry methods of `SqliteStore` (a mixin: the store provides `_call`, `_db`)."""

    # --- purges of deleted devices (sqlite_purge) ---------------------------------------
    _background: list[asyncio.Task[None]]

    async def _purge(self, device_ids: Sequence[UUID]) -> None:
        """Purge deleted devices' points and wait for it. The purge goes on if the caller
        is cancelled (a client hanging up), until the store closes; the next start resumes."""
        task = asyncio.create_task(self._purge_devices(device_ids), name="iiot-sqlite-purge")
        self._background.append(task)
        task.add_done_callback(_forget(self._background))
        await asyncio.shield(task)

    async def _purge_devices(self, device_ids: Sequence[UUID]) -> None:
        """Delete deleted devices' points batch by batch, letting other calls in between."""
        for device_id in device_ids:
            # One call per batch: other store calls run between them on the writer's thread.
            while await self._call(lambda d=device_id: purge_chunk(self._db, d)):
                pass
            await self._call(lambda d=device_id: finish_purge(self._db, d))

    def _start_background(self) -> None:
        """Finish purges cut short earlier (a crash, a restart) beside the store."""
        self._background = [asyncio.create_task(self._resume_purges(), name="iiot-sqlite-purge")]

    async def _resume_purges(self) -> None:
        try:
            await self._purge_devices(await self._call(lambda: queued_purges(self._db)))
        except StorageUnavailable as exc:
            log.warning("purging deleted devices' telemetry stopped, next start resumes: %s", exc)

    async def _stop_background(self) -> None:
        tasks = list(getattr(self, "_background", []))  # callbacks edit the list
        self._background = []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def wait_for_purges(self) -> None:
        """Wait until purges resumed at start are done (for tools and tests)."""
        for task in list(getattr(self, "_background", [])):
            await asyncio.shield(task)

    def _device_row(self, scope: Scope, device_id: UUID) -> Device:
        raise NotImplementedError

    # --- telemetry ---------------------------------------------------------------------
    async def write_points(self, batch: Sequence[DevicePoints]) -> None:
        """Store points in one transaction and update latest values.

        Idempotent: a (device, key, ts) already stored keeps one row (the newer value wins).
        Points of devices deleted meanwhile are skipped (logged), so that the rest of the
        batch commits and a pipeline never retries a batch forever. Raises
        `StorageUnavailable` when the database cannot be used now; then nothing of the
        batch is committed and the caller may retry it whole.
        """
        rows = _common.batch_rows(batch)
        if rows.rows:
            await self._call(self._write, rows)

    def _write(self, rows: _common.BatchRows) -> None:
        db = self._db
        with _transaction(db):
            # Inside the write transaction no other writer can delete a device meanwhile.
            alive: set[UUID] = set()
            for i in range(0, len(rows.device_ids), _CHUNK):
                chunk = [d.bytes for d in rows.device_ids[i : i + _CHUNK]]
                alive.update(
                    UUID(bytes=r[0])
                    for r in db.execute(
                        f"SELECT id FROM devices WHERE id IN ({_placeholders(len(chunk))})", chunk
                    )
                )
            if len(alive) != len(rows.device_ids):
                kept = rows.without(alive)
                log.warning(
                    "skipped %d points of %d deleted device(s)",
                    len(rows.rows) - len(kept.rows),
                    len(rows.device_ids) - len(alive),
                )
                rows = kept
            blobs = {d: d.bytes for d in rows.device_ids}
            # Each row is its own statement here, so repeats within the batch need no
            # dedup: they are applied in order and the last one wins.
            db.executemany(_UPSERT_TELEMETRY, [(blobs[r[0]], *r[1:]) for r in rows.rows])
            db.executemany(_UPSERT_LATEST, [(blobs[r[0]], *r[1:]) for r in rows.newest])

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

        def run() -> dict[str, list[tuple[int, Scalar]]]:
            db = self._db
            self._device_row(scope, device_id)
            keys = self._keys(device_id, query.keys)
            check_response_size(query, len(keys))
            if not keys or query.end <= query.start or query.limit == 0:
                return {}
            result: dict[str, list[tuple[int, Scalar]]] = {}
            if query.agg == "none":
                for key in keys:
                    rows = db.execute(
                        f"SELECT ts, {_VALUE_COLS} FROM telemetry"
                        " WHERE device_id = ? AND key = ? AND ts >= ? AND ts < ?"
                        f" ORDER BY ts {direction} LIMIT ?",
                        (device_id.bytes, key, query.start, query.end, query.limit),
                    ).fetchall()
                    if rows:
                        result[key] = [(r[0], _common.value_from_columns(*r[1:])) for r in rows]
                return result
            convert: Callable[[Any], Scalar] = int if query.agg == "count" else float
            iv = query.interval_ms
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i : i + _CHUNK]
                names = {f"k{j}": key for j, key in enumerate(chunk)}
                rows = db.execute(
                    f"""
                    WITH p AS (
                        SELECT key, ts - ((ts % :iv) + :iv) % :iv AS bucket,
                               coalesce(num_value, int_value) AS num
                        FROM telemetry
                        WHERE device_id = :dev AND key IN ({", ".join(":" + n for n in names)})
                          AND ts >= :start AND ts < :end
                    ), g AS (
                        SELECT key, bucket, {_AGG_SQL[query.agg]} AS value
                        FROM p GROUP BY key, bucket
                        HAVING {"1" if query.agg == "count" else "count(num) > 0"}
                    ), r AS (
                        SELECT key, bucket, value, row_number() OVER
                               (PARTITION BY key ORDER BY bucket {direction}) AS n
                        FROM g
                    )
                    SELECT key, bucket, value FROM r WHERE n <= :limit
                    ORDER BY key, bucket {direction}
                    """,
                    {
                        "iv": iv,
                        "dev": device_id.bytes,
                        "start": query.start,
                        "end": query.end,
                        "limit": query.limit,
                        **names,
                    },
                ).fetchall()
                for key, bucket, value in rows:
                    result.setdefault(key, []).append((bucket, convert(value)))
            return result

        return await self._read_call(run)

    def _keys(self, device_id: UUID, keys: tuple[str, ...] | None) -> list[str]:
        if keys is not None:
            return list(dict.fromkeys(keys))
        # Every key ever written has a latest row: far cheaper than scanning telemetry.
        rows = self._db.execute(
            "SELECT key FROM telemetry_latest WHERE device_id = ? ORDER BY key",
            (device_id.bytes,),
        )
        return [r[0] for r in rows]

    async def latest(
        self, scope: Scope, device_id: UUID, keys: Sequence[str] | None = None
    ) -> dict[str, Point]:
        """The newest point (largest ts) of each key of a device."""
        wanted = None if keys is None else set(keys)

        def run() -> dict[str, Point]:
            self._device_row(scope, device_id)
            rows = self._db.execute(
                f"SELECT key, ts, {_VALUE_COLS} FROM telemetry_latest"
                " WHERE device_id = ? ORDER BY key",
                (device_id.bytes,),
            )
            return {
                r[0]: Point(r[0], r[1], _common.value_from_columns(*r[2:]))
                for r in rows
                if wanted is None or r[0] in wanted
            }

        return await self._read_call(run)

    async def delete_telemetry_before(self, tenant_id: UUID, before_ts: int) -> int:
        """Delete a tenant's raw telemetry older than `before_ts`; returns rows removed.

        Works in small batches, each its own short write transaction, one (device, key)
        range of the primary key at a time: the write lock is released between batches, so
        ingestion keeps committing while old data goes.
        """
        batch = 5000  # rows per write transaction: a few tens of ms of write lock at most

        def series() -> list[tuple[bytes, str]]:
            # Every key ever written has a latest row (kept by retention): the index ranges.
            return [
                (r[0], r[1])
                for r in self._db.execute(
                    "SELECT l.device_id, l.key FROM telemetry_latest l"
                    " JOIN devices d ON d.id = l.device_id WHERE d.tenant_id = ?"
                    " ORDER BY l.device_id, l.key",
                    (tenant_id.bytes,),
                )
            ]

        def chunk(device_id: bytes, key: str) -> int:
            with _transaction(self._db):
                # The batch ends at the batch-th oldest expired point (ts is unique within
                # a series), so each DELETE is one bounded index range.
                cursor = self._db.execute(
                    "DELETE FROM telemetry WHERE device_id = :d AND key = :k AND ts <"
                    " coalesce((SELECT ts + 1 FROM telemetry WHERE device_id = :d AND key = :k"
                    "  AND ts < :before ORDER BY ts LIMIT 1 OFFSET :n - 1), :before)",
                    {"d": device_id, "k": key, "before": before_ts, "n": batch},
                )
                return cursor.rowcount

        removed = 0
        for device_id, key in await self._call(series):
            while True:
                # One call per batch: other store calls run between them on the worker.
                deleted = await self._call(chunk, device_id, key)
                removed += deleted
                if deleted < batch:
                    break
        return removed
