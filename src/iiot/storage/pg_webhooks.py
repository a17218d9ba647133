"""Webhooks, their outbox and delivery log on PostgreSQL (a `PostgresAlarmStore` mixin).

An alarm change queues its outbox rows in its own transaction (`_enqueue`); senders claim
due rows under `FOR UPDATE SKIP LOCKED` and hide them for a lease, so that concurrent
senders never take the same row.
"""

from __future__ import annotations

import contextlib
from typing import Any
from uuid import UUID, uuid4

import asyncpg

from iiot.alarms.model import Delivery, OutboxItem, Webhook
from iiot.errors import NotFound
from iiot.storage import _common
from iiot.storage.alarm_common import DELIVERY_COLS, WEBHOOK_COLS, as_is, events_text, webhook_of
from iiot.storage.base import Page, Scope
from iiot.storage.postgres import PostgresStore
from iiot.storage.postgres_pool import scoped_page

__all__ = ["PostgresWebhooks"]


def _webhook(row: Any) -> Webhook:
    return webhook_of(row, as_is)


class PostgresWebhooks:
    """The webhook and outbox methods of `PostgresAlarmStore` (on the store's pool)."""

    _store: PostgresStore

    # --- outbox ------------------------------------------------------------------------
    @staticmethod
    async def _enqueue(
        conn: Any, tenant_id: UUID, event: str, event_id: str, body: bytes, now: int
    ) -> int:
        """Queue an event for the tenant's webhooks that want it, in `conn`'s transaction."""
        result = await conn.execute(
            "INSERT INTO webhook_outbox (webhook_id, event, event_id, body, created_at,"
            " next_attempt_at) SELECT id, $1, $2, $3, $4, $4 FROM webhooks"
            " WHERE tenant_id = $5 AND strpos(events, ',' || $1 || ',') > 0"
            " ON CONFLICT (webhook_id, event_id) DO NOTHING",
            event,
            event_id,
            body,
            now,
            tenant_id,
        )
        return int(result.split()[-1])

    # --- webhooks ----------------------------------------------------------------------
    async def create_webhook(
        self, tenant_id: UUID, url: str, secret: str, events: tuple[str, ...]
    ) -> Webhook:
        """Register a webhook of a tenant."""
        hook = Webhook(uuid4(), tenant_id, url, secret, events, _common.now_ms())

        async def op(conn: Any) -> Webhook:
            try:
                await conn.execute(
                    f"INSERT INTO webhooks ({WEBHOOK_COLS}) VALUES ($1, $2, $3, $4, $5, $6)",
                    hook.id,
                    tenant_id,
                    url,
                    secret,
                    events_text(events),
                    hook.created_at,
                )
            except asyncpg.ForeignKeyViolationError as exc:
                raise NotFound(f"tenant {tenant_id} not found") from exc
            return hook

        return await self._store._run(op, retry=False)

    @staticmethod
    async def _webhook_row(conn: Any, scope: Scope, webhook_id: UUID) -> Webhook:
        row = await conn.fetchrow(
            f"SELECT {WEBHOOK_COLS} FROM webhooks"
            " WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)",
            webhook_id,
            scope,
        )
        if row is None:
            raise NotFound(f"webhook {webhook_id} not found")
        return _webhook(row)

    async def get_webhook(self, scope: Scope, webhook_id: UUID) -> Webhook:
        """One webhook visible in the scope."""

        async def op(conn: Any) -> Webhook:
            return await self._webhook_row(conn, scope, webhook_id)

        return await self._store._run(op)

    async def list_webhooks(self, scope: Scope, limit: int, offset: int) -> Page[Webhook]:
        """Webhooks visible in the scope, oldest first."""
        _common.check_page(limit, offset)

        async def op(conn: Any) -> Page[Webhook]:
            rows, total = await scoped_page(
                conn,
                "webhooks",
                WEBHOOK_COLS,
                "tenant_id",
                "created_at, id",
                scope,
                (limit, offset),
            )
            return Page([_webhook(r) for r in rows], total)

        return await self._store._run(op)

    async def delete_webhook(self, scope: Scope, webhook_id: UUID) -> None:
        """Delete a webhook with its outbox and delivery log."""

        async def op(conn: Any) -> None:
            async with conn.transaction():
                await self._webhook_row(conn, scope, webhook_id)
                await conn.execute("DELETE FROM webhooks WHERE id = $1", webhook_id)

        await self._store._run(op, retry=False)

    async def enqueue_event(self, tenant_id: UUID, event: str, event_id: str, body: bytes) -> int:
        """Queue an event for every webhook of the tenant that wants it (once per event id)."""

        async def op(conn: Any) -> int:
            return await self._enqueue(conn, tenant_id, event, event_id, body, _common.now_ms())

        return await self._store._run(op)

    async def claim_outbox(self, now: int, limit: int, lease_ms: int) -> list[OutboxItem]:
        """Due outbox items, hidden from other senders for `lease_ms`."""

        async def op(conn: Any) -> list[OutboxItem]:
            rows = await conn.fetch(
                "WITH due AS (SELECT id FROM webhook_outbox"
                "  WHERE done_at IS NULL AND next_attempt_at <= $1"
                "  ORDER BY next_attempt_at, id LIMIT $2 FOR UPDATE SKIP LOCKED),"
                " claimed AS (UPDATE webhook_outbox o SET next_attempt_at = $1 + $3"
                "  FROM due WHERE o.id = due.id"
                "  RETURNING o.id, o.webhook_id, o.event, o.event_id, o.body, o.attempts,"
                "  o.created_at)"
                " SELECT c.id, c.webhook_id, w.url, w.secret, c.event, c.event_id, c.body,"
                " c.attempts, c.created_at FROM claimed c JOIN webhooks w ON w.id = c.webhook_id"
                " ORDER BY c.id",
                now,
                limit,
                lease_ms,
            )
            return [OutboxItem(*r) for r in rows]

        return await self._store._run(op, retry=False)

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

        async def op(conn: Any) -> None:
            async with conn.transaction():
                await conn.execute(
                    "UPDATE webhook_outbox SET attempts = attempts + 1,"
                    " next_attempt_at = coalesce($2, next_attempt_at),"
                    " done_at = CASE WHEN $2::bigint IS NULL THEN $3::bigint END WHERE id = $1",
                    item.id,
                    next_attempt_at,
                    ts,
                )
                await conn.execute(
                    "INSERT INTO webhook_deliveries (webhook_id, event, event_id, attempt, ts,"
                    " status_code, error, duration_ms, outcome)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    item.webhook_id,
                    item.event,
                    item.event_id,
                    item.attempts + 1,
                    ts,
                    status_code,
                    error,
                    duration_ms,
                    outcome,
                )

        # The webhook was deleted while its event was in flight: nothing to record.
        with contextlib.suppress(asyncpg.ForeignKeyViolationError):
            await self._store._run(op, retry=False)

    async def next_outbox_due(self) -> int | None:
        """When the earliest pending outbox item is due (Unix ms), if any."""

        async def op(conn: Any) -> int | None:
            value = await conn.fetchval(
                "SELECT min(next_attempt_at) FROM webhook_outbox WHERE done_at IS NULL"
            )
            return None if value is None else int(value)

        return await self._store._run(op)

    async def list_deliveries(
        self, scope: Scope, webhook_id: UUID, limit: int, offset: int
    ) -> Page[Delivery]:
        """A webhook's delivery attempts, newest first."""
        _common.check_page(limit, offset)

        async def op(conn: Any) -> Page[Delivery]:
            await self._webhook_row(conn, scope, webhook_id)
            total = await conn.fetchval(
                "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = $1", webhook_id
            )
            rows = await conn.fetch(
                f"SELECT {DELIVERY_COLS} FROM webhook_deliveries WHERE webhook_id = $1"
                " ORDER BY id DESC LIMIT $2 OFFSET $3",
                webhook_id,
                limit,
                offset,
            )
            return Page([Delivery(*r) for r in rows], total)

        return await self._store._run(op)
