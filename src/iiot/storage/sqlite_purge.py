"""Purging the telemetry of deleted devices on SQLite, one short write transaction per batch.

A deletion removes the device rows and queues their ids in `telemetry_purges` in one
transaction (migration 0008); the points go afterwards, a bounded range of the primary
key per write transaction, as retention deletes them, so the write lock is free between
batches and ingestion keeps committing. A purge cut short is finished from the queue
when the store opens again. These functions run on the store's writer thread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from uuid import UUID

from iiot.storage import _common
from iiot.storage.sqlite_sql import _transaction

__all__ = ["PURGE_BATCH", "finish_purge", "purge_chunk", "queue_purges", "queued_purges"]

PURGE_BATCH = 5000  # rows per write transaction, as retention


def queue_purges(db: sqlite3.Connection, device_ids: Sequence[UUID]) -> None:
    """In the deleting transaction: remember whose telemetry is still to be purged."""
    now = _common.now_ms()
    db.executemany(
        "INSERT OR IGNORE INTO telemetry_purges (device_id, queued_at) VALUES (?, ?)",
        [(d.bytes, now) for d in device_ids],
    )


def queued_purges(db: sqlite3.Connection) -> list[UUID]:
    """Devices deleted whose telemetry is not purged yet, oldest first."""
    rows = db.execute("SELECT device_id FROM telemetry_purges ORDER BY queued_at").fetchall()
    return [UUID(bytes=r[0]) for r in rows]


def purge_chunk(db: sqlite3.Connection, device_id: UUID) -> bool:
    """Delete up to PURGE_BATCH points of a deleted device; whether more may remain."""
    with _transaction(db):
        # The batch ends at the batch-th point in key order: one bounded range of the key.
        edge = db.execute(
            "SELECT key, ts FROM telemetry WHERE device_id = ? ORDER BY key, ts LIMIT 1 OFFSET ?",
            (device_id.bytes, PURGE_BATCH - 1),
        ).fetchone()
        if edge is None:
            db.execute("DELETE FROM telemetry WHERE device_id = ?", (device_id.bytes,))
            return False
        db.execute(
            "DELETE FROM telemetry WHERE device_id = ? AND (key, ts) <= (?, ?)",
            (device_id.bytes, edge[0], edge[1]),
        )
        return True


def finish_purge(db: sqlite3.Connection, device_id: UUID) -> None:
    """Take a device whose telemetry is gone off the queue."""
    db.execute("DELETE FROM telemetry_purges WHERE device_id = ?", (device_id.bytes,))
