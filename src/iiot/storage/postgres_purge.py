"""Purging the telemetry of deleted devices on PostgreSQL, in short transactions.

A deletion removes the device rows under the writers' lock and queues their ids in
`telemetry_purges` in the same transaction (migration 0008); the points go afterwards,
a bounded range of the primary key per transaction, as retention deletes them. Writers
never wait for a purge, and a purge cut short (a crash, a restart) is finished from the
queue when the store opens again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from uuid import UUID

__all__ = ["PURGE_BATCH", "purge_devices", "queue_purges", "queued_purges"]

log = logging.getLogger("iiot.storage.postgres")
T = TypeVar("T")
Run = Callable[[Callable[[Any], Awaitable[Any]]], Awaitable[Any]]

PURGE_BATCH = 5000  # rows per transaction, as retention: a few tens of ms of row locks


async def queue_purges(conn: Any, device_ids: Sequence[UUID]) -> None:
    """In the deleting transaction: remember whose telemetry is still to be purged."""
    await conn.execute(
        "INSERT INTO telemetry_purges (device_id, queued_at)"
        " SELECT id, (extract(epoch FROM now()) * 1000)::bigint FROM unnest($1::uuid[]) AS id"
        " ON CONFLICT (device_id) DO NOTHING",
        list(device_ids),
    )


async def queued_purges(run: Run) -> list[UUID]:
    """Devices deleted whose telemetry is not purged yet, oldest first."""

    async def op(conn: Any) -> list[UUID]:
        rows = await conn.fetch("SELECT device_id FROM telemetry_purges ORDER BY queued_at")
        return [r["device_id"] for r in rows]

    result: list[UUID] = await run(op)
    return result


async def _chunk(conn: Any, device_id: UUID) -> tuple[int, bool]:
    """Delete up to PURGE_BATCH points of a device: (rows deleted, whether more may remain)."""
    # The batch ends at the batch-th point in key order: one bounded range of the key.
    edge = await conn.fetchrow(
        "SELECT key, ts FROM telemetry WHERE device_id = $1 ORDER BY key, ts OFFSET $2 LIMIT 1",
        device_id,
        PURGE_BATCH - 1,
    )
    if edge is None:
        status = await conn.execute("DELETE FROM telemetry WHERE device_id = $1", device_id)
    else:
        status = await conn.execute(
            "DELETE FROM telemetry WHERE device_id = $1 AND (key, ts) <= ($2, $3)",
            device_id,
            edge["key"],
            edge["ts"],
        )
    return int(status.rsplit(" ", 1)[1]), edge is not None


async def purge_devices(run: Run, device_ids: Sequence[UUID]) -> int:
    """Delete the telemetry of deleted devices batch by batch, then their queue rows."""
    removed = 0
    for device_id in device_ids:
        more = True
        while more:

            async def chunk(conn: Any, device_id: UUID = device_id) -> tuple[int, bool]:
                return await _chunk(conn, device_id)

            deleted, more = await run(chunk)
            removed += deleted

        async def done(conn: Any, device_id: UUID = device_id) -> None:
            await conn.execute("DELETE FROM telemetry_purges WHERE device_id = $1", device_id)

        await run(done)
    if removed:
        log.info("purged %d points of %d deleted device(s)", removed, len(device_ids))
    return removed
