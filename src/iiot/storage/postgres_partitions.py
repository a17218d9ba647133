"""Weekly partitions of the PostgreSQL telemetry table (migration 0008).

`telemetry` is partitioned by range of `ts`: one partition per week counted from the Unix
epoch, named `telemetry_w{week number}`, made `AHEAD_WEEKS` ahead of time (and
`BEHIND_WEEKS` back) by the store (at start, then hourly), so that ingestion never waits
for one to be made. Points outside
every weekly partition (far past or future dates) land in `telemetry_default`; a week made
later takes its points from there. `telemetry_legacy` holds what an existing table held
when it was converted, every ts before the week after the conversion.

Retention drops a weekly partition whole once it is past a tenant's cutoff and holds
points of that tenant's devices only (or of devices already deleted); anything else is
deleted row by row, in batches, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from iiot.storage import _common

__all__ = [
    "AHEAD_WEEKS",
    "BEHIND_WEEKS",
    "WEEK_MS",
    "drop_expired_partitions",
    "ensure_partitions",
    "partition_name",
]

log = logging.getLogger("iiot.storage.postgres")
Run = Callable[[Callable[[Any], Awaitable[Any]]], Awaitable[Any]]

WEEK_MS = 7 * 86_400_000
AHEAD_WEEKS = 4  # weeks made beyond the current one
BEHIND_WEEKS = 1  # and before it: late points of last week get a partition too
_PREFIX = "telemetry_w"
# DDL on the parent waits for transactions using it; it must never hold writers up long.
_LOCK_TIMEOUT = "500ms"
_STORAGE = "autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 100000"
# The partitions of telemetry with their bounds, as PostgreSQL prints them.
_PARTITIONS_SQL = (
    "SELECT c.relname, c.reltuples::bigint AS estimate FROM pg_inherits i"
    " JOIN pg_class c ON c.oid = i.inhrelid"
    " WHERE i.inhparent = 'telemetry'::regclass ORDER BY c.relname"
)
# The distinct devices of one partition, one index probe each (a skip scan of its key).
_DEVICES_OF = """
WITH RECURSIVE ids AS (
    (SELECT device_id FROM {table} ORDER BY device_id LIMIT 1)
    UNION ALL
    SELECT (SELECT t.device_id FROM {table} t WHERE t.device_id > ids.device_id
            ORDER BY t.device_id LIMIT 1)
    FROM ids WHERE ids.device_id IS NOT NULL
)
SELECT device_id FROM ids WHERE device_id IS NOT NULL
"""


def partition_name(week: int) -> str:
    """The name of the partition of week number `week` (ts // WEEK_MS)."""
    return f"{_PREFIX}{week}"


def _week_of(name: str) -> int | None:
    suffix = name.removeprefix(_PREFIX)
    return int(suffix) if name.startswith(_PREFIX) and suffix.isdigit() else None


async def ensure_partitions(run: Run, now_ms: int | None = None) -> list[str]:
    """Make the partitions of last week, this week and the next `AHEAD_WEEKS`; returns
    those made."""
    now = _common.now_ms() if now_ms is None else now_ms
    current = now // WEEK_MS

    async def existing(conn: Any) -> set[str]:
        return {r["relname"] for r in await conn.fetch(_PARTITIONS_SQL)}

    have = await run(existing)
    made = []
    for week in range(current - BEHIND_WEEKS, current + AHEAD_WEEKS + 1):
        name = partition_name(week)
        if name in have:
            continue

        async def make(conn: Any, name: str = name, week: int = week) -> bool:
            return await _make(conn, name, week)

        if await run(make):
            made.append(name)
    if made:
        log.info("made telemetry partitions %s", ", ".join(made))
    return made


async def _make(conn: Any, name: str, week: int) -> bool:
    start, end = week * WEEK_MS, (week + 1) * WEEK_MS
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
            # Made apart and then attached: ATTACH takes a lock that lets writers go on.
            await conn.execute(
                f"CREATE TABLE {name} (LIKE telemetry INCLUDING DEFAULTS INCLUDING CONSTRAINTS"
                f" INCLUDING INDEXES) WITH ({_STORAGE})"
            )
            # Points that arrived for this week before it had a partition.
            await conn.execute(
                f"WITH moved AS (DELETE FROM telemetry_default WHERE ts >= $1 AND ts < $2"
                f" RETURNING *) INSERT INTO {name} SELECT * FROM moved",
                start,
                end,
            )
            await conn.execute(
                f"ALTER TABLE telemetry ATTACH PARTITION {name}"
                f" FOR VALUES FROM ({start}) TO ({end})"
            )
    except asyncpg.InvalidObjectDefinitionError:
        return False  # the week lies in telemetry_legacy's range
    except asyncpg.LockNotAvailableError:
        log.info("telemetry partition %s not made now (the table is busy); retrying later", name)
        return False
    return True


async def drop_expired_partitions(run: Run, tenant_id: Any, before_ts: int) -> int:
    """Drop the weekly partitions wholly before `before_ts` that hold only this tenant's
    points (or deleted devices'); returns the rows they held (the planner's estimate)."""

    async def candidates(conn: Any) -> list[tuple[str, int]]:
        rows = await conn.fetch(_PARTITIONS_SQL)
        result = []
        for row in rows:
            week = _week_of(row["relname"])
            if week is not None and (week + 1) * WEEK_MS <= before_ts:
                result.append((row["relname"], max(0, int(row["estimate"]))))
        return result

    removed = 0
    for name, estimate in await run(candidates):

        async def drop(conn: Any, name: str = name) -> bool:
            try:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
                    # Dropping a partition locks the whole table anyway; taken first, no
                    # late point of another tenant can slip in between check and drop.
                    await conn.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")
                    rows = await conn.fetch(_DEVICES_OF.format(table=name))
                    others = await conn.fetchval(
                        "SELECT count(*) FROM devices"
                        " WHERE id = ANY($1::uuid[]) AND tenant_id <> $2",
                        [r["device_id"] for r in rows],
                        tenant_id,
                    )
                    if others:
                        return False  # another tenant's points: deleted row by row instead
                    await conn.execute(f"DROP TABLE {name}")
                    return True
            except asyncpg.LockNotAvailableError:
                log.info("telemetry partition %s is busy; its rows go one by one", name)
                return False

        if await run(drop):
            log.info("dropped telemetry partition %s (about %d points)", name, estimate)
            removed += estimate
    return removed
