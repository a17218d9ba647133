"""Webhooks, their outbox and delivery log on SQLite (a `SqliteAlarmStore` mixin).

An alarm change queues its outbox rows in its own transaction (`_enqueue`); a sender's
claim moves the due rows' next attempt a lease ahead under `BEGIN IMMEDIATE`, so that
other senders (other processes too) do not take them meanwhile.
"""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Any
from uuid import UUID, uuid4

from iiot.alarms.model import Delivery, OutboxItem, Webhook
from iiot.errors import NotFound
from iiot.storage import _common
from iiot.storage.alarm_common import DELIVERY_COLS, WEBHOOK_COLS, events_text, webhook_of
from iiot.storage.base import Page, Scope
from iiot.storage.sqlite_alarm_part import SqliteAlarmPart, _scoped, _uuid
from iiot.storage.sqlite_sql import _transaction

__all__ = ["SqliteWebhooks"]


def _webhook(row: Any) -> Webhook:
    return webhook_of(row, _uuid)


class SqliteWebhooks(SqliteAlarmPart):
    """The webhook and outbox methods of `SqliteAlarmStore`."""

    # --- outbox ------------------------------------------------------------------------
    def _enqueue(self, tenant_id: UUID, event: str, event_id: str, body: bytes, now: int) -> int:
        """Queue an event for the tenant's webhooks that want it (in the caller's transaction)."""
        cursor = self._db.execute(
            "INSERT INTO webhook_outbox (webhook_id, event, event_id, body, created_at,"
            " next_attempt_at) SELECT id, ?, ?, ?, ?, ? FROM webhooks"
            " WHERE tenant_id = ? AND instr(events, ',' || ? || ',') > 0"
            " ON CONFLICT (webhook_id, event_id) DO NOTHING",
            (event, event_id, body, now, now, tenant_id.bytes, event),
        )
        return cursor.rowcount

    # --- webhooks ----------------------------------------------------------------------
    async def create_webhook(
        self, tenant_id: UUID, url: str, secret: str, events: tuple[str, ...]
    ) -> Webhook:
        """Register a webhook of a tenant."""

        def run() -> Webhook:
            hook = Webhook(uuid4(), tenant_id, url, secret, events, _common.now_ms())
            try:
                self._db.execute(
                    f"INSERT INTO webhooks ({WEBHOOK_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        hook.id.bytes,
                        tenant_id.bytes,
                        url,
                        secret,
                        events_text(events),
                        hook.created_at,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise NotFound(f"tenant {tenant_id} not found") from exc
            return hook

        return await self._store._call(run)

    def _webhook_row(self, scope: Scope, webhook_id: UUID) -> Webhook:
        extra, args = _scoped(scope)
        row = self._db.execute(
            f"SELECT {WEBHOOK_COLS} FROM webhooks WHERE id = ?{extra}", (webhook_id.bytes, *args)
        ).fetchone()
        if row is None:
            raise NotFound(f"webhook {webhook_id} not found")
        return _webhook(row)

    async def get_webhook(self, scope: Scope, webhook_id: UUID) -> Webhook:
        """One webhook visible in the scope."""
        return await self._store._call(self._webhook_row, scope, webhook_id)

    async def list_webhooks(self, scope: Scope, limit: int, offset: int) -> Page[Webhook]:
        """Webhooks visible in the scope, oldest first."""
        _common.check_page(limit, offset)

        def run() -> Page[Webhook]:
            where, args = ("", ()) if scope is None else ("WHERE tenant_id = ?", (scope.bytes,))
            total = self._db.execute(f"SELECT count(*) FROM webhooks {where}", args).fetchone()
            rows = self._db.execute(
                f"SELECT {WEBHOOK_COLS} FROM webhooks {where}"
                " ORDER BY created_at, id LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
            return Page([_webhook(r) for r in rows], total[0])

        return await self._store._call(run)

    async def delete_webhook(self, scope: Scope, webhook_id: UUID) -> None:
        """Delete a webhook with its outbox and delivery log."""

        def run() -> None:
            with _transaction(self._db):
                self._webhook_row(scope, webhook_id)
                self._db.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id.bytes,))

        await self._store._call(run)

    async def enqueue_event(self, tenant_id: UUID, event: str, event_id: str, body: bytes) -> int:
        """Queue an event for every webhook of the tenant that wants it (once per event id)."""

        def run() -> int:
            return self._enqueue(tenant_id, event, event_id, body, _common.now_ms())

        return await self._store._call(run)

    async def claim_outbox(self, now: int, limit: int, lease_ms: int) -> list[OutboxItem]:
        """Due outbox items, hidden from other senders for `lease_ms`."""

        def run() -> list[OutboxItem]:
            # Looked at first without the write lock: most polls find nothing due.
            due = self._db.execute(
                "SELECT 1 FROM webhook_outbox WHERE done_at IS NULL AND next_attempt_at <= ?"
                " LIMIT 1",
                (now,),
            ).fetchone()
            if due is None:
                return []
            with _transaction(self._db):
                rows = self._db.execute(
                    "SELECT o.id, o.webhook_id, w.url, w.secret, o.event, o.event_id, o.body,"
                    " o.attempts,"
                    " o.created_at FROM webhook_outbox o JOIN webhooks w ON w.id = o.webhook_id"
                    " WHERE o.done_at IS NULL AND o.next_attempt_at <= ?"
                    " ORDER BY o.next_attempt_at, o.id LIMIT ?",
                    (now, limit),
                ).fetchall()
                self._db.executemany(
                    "UPDATE webhook_outbox SET next_attempt_at = ? WHERE id = ?",
                    [(now + lease_ms, r[0]) for r in rows],
                )
            return [
                OutboxItem(r[0], _uuid(r[1]), r[2], r[3], r[4], r[5], bytes(r[6]), r[7], r[8])
                for r in rows
            ]

        return await self._store._call(run)

    async def finish_attempt(
        self,
        item: OutboxItem,
        ts: int,
        status_code: int | None,
        error: str | None,
        duration_ms: int,
        next_attempt_at: int | None,
        outcome: str,
    ) -> None:
        """Log one attempt; `next_attempt_at` None ends the item (delivered or abandoned)."""

        def run() -> None:
            with _transaction(self._db):
                self._db.execute(
                    "UPDATE webhook_outbox SET attempts = attempts + 1,"
                    " next_attempt_at = coalesce(?, next_attempt_at),"
                    " done_at = CASE WHEN ? IS NULL THEN ? END WHERE id = ?",
                    (next_attempt_at, next_attempt_at, ts, item.id),
                )
                self._db.execute(
                    f"INSERT INTO webhook_deliveries ({DELIVERY_COLS})"
                    " VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        item.webhook_id.bytes,
                        item.event,
                        item.event_id,
                        item.attempts + 1,
                        ts,
                        status_code,
                        error,
                        duration_ms,
                        outcome,
                    ),
                )

        # The webhook was deleted while its event was in flight: nothing to record.
        with contextlib.suppress(sqlite3.IntegrityError):
            await self._store._call(run)

    async def next_outbox_due(self) -> int | None:
        """When the earliest pending outbox item is due (Unix ms), if any."""

        def run() -> int | None:
            row = self._db.execute(
                "SELECT min(next_attempt_at) FROM webhook_outbox WHERE done_at IS NULL"
            ).fetchone()
            return None if row[0] is None else int(row[0])

        return await self._store._call(run)

    async def list_deliveries(
        self, scope: Scope, webhook_id: UUID, limit: int, offset: int
    ) -> Page[Delivery]:
        """A webhook's delivery attempts, newest first."""
        _common.check_page(limit, offset)

        def run() -> Page[Delivery]:
            self._webhook_row(scope, webhook_id)
            total = self._db.execute(
                "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = ?",
                (webhook_id.bytes,),
            ).fetchone()
            rows = self._db.execute(
                f"SELECT {DELIVERY_COLS} FROM webhook_deliveries WHERE webhook_id = ?"
                " ORDER BY id DESC LIMIT ? OFFSET ?",
                (webhook_id.bytes, limit, offset),
            ).fetchall()
            return Page(
                [Delivery(r[0], _uuid(r[1]), *r[2:]) for r in rows],
                total[0],
            )

        return await self._store._call(run)
