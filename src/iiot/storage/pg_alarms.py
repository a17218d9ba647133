"""`PostgresAlarmStore`: alarms, rules and webhooks on the PostgreSQL store's pool.

Raising is UPDATE-then-INSERT: when two processes insert the first alarm of a (device,
type) at once, the partial unique index `alarms_one_open` makes the second insert fail
and that writer updates the alarm the first one opened.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any
from uuid import UUID, uuid4

import asyncpg

from iiot.alarms.model import Alarm, AlarmFilter, Delivery, OutboxItem, Rule, Severity, Webhook
from iiot.errors import Conflict, NotFound
from iiot.storage import _common
from iiot.storage.alarm_base import AlarmChange
from iiot.storage.alarm_common import (
    ALARM_COLS,
    alarm_event_body,
    alarm_of,
    events_text,
    filter_sql,
    rank,
)
from iiot.storage.base import Page, Scope
from iiot.storage.postgres import PostgresStore

__all__ = ["PostgresAlarmStore"]

_RULE_COLS = "id, tenant_id, spec, created_at, updated_at"
_WEBHOOK_COLS = "id, tenant_id, url, secret, events, created_at"
_DELIVERY_COLS = (
    "id, webhook_id, event, event_id, attempt, ts, status_code, error, duration_ms, outcome"
)
_ESCALATE = """
UPDATE alarms SET end_ts = greatest(end_ts, $2),
    severity = CASE WHEN $3 > severity_rank THEN $4 ELSE severity END,
    value = CASE WHEN $3 > severity_rank THEN $5::jsonb ELSE value END,
    rule_id = CASE WHEN $3 > severity_rank THEN $6 ELSE rule_id END,
    severity_rank = greatest(severity_rank, $3)
WHERE id = $1
"""


def _same(value: Any) -> Any:
    return value


def _rule(row: Any) -> Rule:
    return Rule(row[0], row[1], json.loads(row[2]), row[3], row[4])


def _webhook(row: Any) -> Webhook:
    events = tuple(e for e in row[4].split(",") if e)
    return Webhook(row[0], row[1], row[2], row[3], events, row[5])


def _alarm(row: Any) -> Alarm:
    return alarm_of(row, _same)


def _dollar(n: int) -> str:
    return f"${n}"


class PostgresAlarmStore:
    """The `AlarmStore` on an open `PostgresStore`."""

    def __init__(self, store: PostgresStore) -> None:
        """Share the store's pool."""
        self._store = store

    # --- rules -------------------------------------------------------------------------
    async def create_rule(self, tenant_id: UUID, spec: dict[str, Any]) -> Rule:
        """Store a validated rule; `Conflict` if its name is taken in the tenant."""
        now = _common.now_ms()
        rule = Rule(uuid4(), tenant_id, spec, now, now)

        async def op(conn: Any) -> Rule:
            try:
                await conn.execute(
                    f"INSERT INTO alarm_rules ({_RULE_COLS}, name)"
                    " VALUES ($1, $2, $3::jsonb, $4, $4, $5)",
                    rule.id,
                    tenant_id,
                    json.dumps(spec),
                    now,
                    rule.name,
                )
            except asyncpg.ForeignKeyViolationError as exc:
                raise NotFound(f"tenant {tenant_id} not found") from exc
            except asyncpg.UniqueViolationError as exc:
                raise Conflict(f"a rule named {rule.name!r} already exists") from exc
            return rule

        return await self._store._run(op, retry=False)

    @staticmethod
    async def _rule_row(conn: Any, scope: Scope, rule_id: UUID) -> Rule:
        row = await conn.fetchrow(
            f"SELECT {_RULE_COLS} FROM alarm_rules"
            " WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)",
            rule_id,
            scope,
        )
        if row is None:
            raise NotFound(f"rule {rule_id} not found")
        return _rule(row)

    async def get_rule(self, scope: Scope, rule_id: UUID) -> Rule:
        """One rule visible in the scope."""

        async def op(conn: Any) -> Rule:
            return await self._rule_row(conn, scope, rule_id)

        return await self._store._run(op)

    async def list_rules(self, scope: Scope, limit: int, offset: int) -> Page[Rule]:
        """Rules visible in the scope, by name."""
        _common.check_page(limit, offset)

        async def op(conn: Any) -> Page[Rule]:
            where = "WHERE ($1::uuid IS NULL OR tenant_id = $1)"
            total = await conn.fetchval(f"SELECT count(*) FROM alarm_rules {where}", scope)
            rows = await conn.fetch(
                f"SELECT {_RULE_COLS} FROM alarm_rules {where}"
                " ORDER BY name, id LIMIT $2 OFFSET $3",
                scope,
                limit,
                offset,
            )
            return Page([_rule(r) for r in rows], total)

        return await self._store._run(op)

    async def replace_rule(self, scope: Scope, rule_id: UUID, spec: dict[str, Any]) -> Rule:
        """Replace a rule's specification (its evaluation state starts over)."""

        async def op(conn: Any) -> Rule:
            async with conn.transaction():
                await self._rule_row(conn, scope, rule_id)
                try:
                    await conn.execute(
                        "UPDATE alarm_rules SET spec = $2::jsonb, name = $3, updated_at = $4"
                        " WHERE id = $1",
                        rule_id,
                        json.dumps(spec),
                        spec["name"],
                        _common.now_ms(),
                    )
                except asyncpg.UniqueViolationError as exc:
                    raise Conflict(f"a rule named {spec['name']!r} already exists") from exc
                await conn.execute("DELETE FROM alarm_rule_state WHERE rule_id = $1", rule_id)
                return await self._rule_row(conn, scope, rule_id)

        return await self._store._run(op, retry=False)

    async def delete_rule(self, scope: Scope, rule_id: UUID) -> Rule:
        """Delete a rule with its evaluation state; returns what was deleted."""

        async def op(conn: Any) -> Rule:
            async with conn.transaction():
                rule = await self._rule_row(conn, scope, rule_id)
                await conn.execute("DELETE FROM alarm_rules WHERE id = $1", rule_id)
                return rule

        return await self._store._run(op, retry=False)

    async def all_rules(self) -> list[Rule]:
        """Every rule of every tenant, for the evaluation engine."""

        async def op(conn: Any) -> list[Rule]:
            return [_rule(r) for r in await conn.fetch(f"SELECT {_RULE_COLS} FROM alarm_rules")]

        return await self._store._run(op)

    async def rule_states(self) -> dict[tuple[UUID, UUID], dict[str, Any]]:
        """Every persisted (rule, device) evaluation state."""

        async def op(conn: Any) -> dict[tuple[UUID, UUID], dict[str, Any]]:
            rows = await conn.fetch("SELECT rule_id, device_id, state FROM alarm_rule_state")
            return {(r[0], r[1]): json.loads(r[2]) for r in rows}

        return await self._store._run(op)

    async def save_rule_state(self, rule_id: UUID, device_id: UUID, state: dict[str, Any]) -> None:
        """Persist one (rule, device) state (ignored when the rule or device is gone)."""

        async def op(conn: Any) -> None:
            # The rule or the device was deleted meanwhile: nothing to record.
            with contextlib.suppress(asyncpg.ForeignKeyViolationError):
                await conn.execute(
                    "INSERT INTO alarm_rule_state (rule_id, device_id, state, updated_at)"
                    " VALUES ($1, $2, $3::jsonb, $4) ON CONFLICT (rule_id, device_id) DO UPDATE"
                    " SET state = EXCLUDED.state, updated_at = EXCLUDED.updated_at",
                    rule_id,
                    device_id,
                    json.dumps(state),
                    _common.now_ms(),
                )

        await self._store._run(op)

    # --- alarms ------------------------------------------------------------------------
    @staticmethod
    async def _enqueue(
        conn: Any, tenant_id: UUID, event: str, event_id: str, body: bytes, now: int
    ) -> int:
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

    async def _notify(self, conn: Any, kind: str, alarm: Alarm) -> None:
        now = _common.now_ms()
        event, event_id, body = alarm_event_body(kind, alarm, now)
        await self._enqueue(conn, alarm.tenant_id, event, event_id, body, now)

    @staticmethod
    async def _open_row(conn: Any, device_id: UUID, alarm_type: str) -> Alarm | None:
        row = await conn.fetchrow(
            f"SELECT {ALARM_COLS} FROM alarms"
            " WHERE device_id = $1 AND type = $2 AND NOT cleared FOR UPDATE",
            device_id,
            alarm_type,
        )
        return None if row is None else _alarm(row)

    @staticmethod
    async def _alarm_row(conn: Any, scope: Scope, alarm_id: UUID, lock: bool = False) -> Alarm:
        row = await conn.fetchrow(
            f"SELECT {ALARM_COLS} FROM alarms"
            " WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)"
            + (" FOR UPDATE" if lock else ""),
            alarm_id,
            scope,
        )
        if row is None:
            raise NotFound(f"alarm {alarm_id} not found")
        return _alarm(row)

    async def raise_alarm(
        self,
        tenant_id: UUID,
        device_id: UUID,
        alarm_type: str,
        severity: Severity,
        ts: int,
        value: Any,
        rule_id: UUID | None,
        details: dict[str, Any],
    ) -> AlarmChange:
        """Open an alarm, or update the open one of (device, type): never a second one."""
        severity = Severity(severity)
        level = rank(severity)
        value_json = json.dumps(value)

        async def update(conn: Any, current: Alarm) -> AlarmChange:
            escalate = level > rank(current.severity)
            await conn.execute(
                _ESCALATE, current.id, ts, level, severity.value, value_json, rule_id
            )
            alarm = await self._alarm_row(conn, None, current.id)
            if escalate:
                await self._notify(conn, "updated", alarm)
            return alarm, "updated" if escalate else None

        async def op(conn: Any) -> AlarmChange:
            async with conn.transaction():
                current = await self._open_row(conn, device_id, alarm_type)
                if current is not None:
                    return await update(conn, current)
                alarm_id = uuid4()
                try:
                    async with conn.transaction():  # a savepoint: the insert may lose a race
                        await conn.execute(
                            f"INSERT INTO alarms ({ALARM_COLS}, severity_rank) VALUES"
                            " ($1, $2, $3, $4, $5, false, false, $6, $6, NULL, NULL, NULL,"
                            " $7::jsonb, $8, $9::jsonb, $10)",
                            alarm_id,
                            tenant_id,
                            device_id,
                            alarm_type,
                            severity.value,
                            ts,
                            value_json,
                            rule_id,
                            json.dumps(details),
                            level,
                        )
                except asyncpg.ForeignKeyViolationError as exc:
                    raise NotFound(f"device {device_id} not found") from exc
                except asyncpg.UniqueViolationError:
                    # Another writer opened it first: the unique index decided.
                    current = await self._open_row(conn, device_id, alarm_type)
                    if current is None:
                        raise
                    return await update(conn, current)
                alarm = await self._alarm_row(conn, None, alarm_id)
                await self._notify(conn, "raised", alarm)
                return alarm, "raised"

        return await self._store._run(op, retry=False)

    async def _clear(self, conn: Any, current: Alarm, ts: int) -> Alarm:
        await conn.execute(
            "UPDATE alarms SET cleared = true, clear_ts = $2 WHERE id = $1", current.id, ts
        )
        alarm = await self._alarm_row(conn, None, current.id)
        await self._notify(conn, "cleared", alarm)
        return alarm

    async def clear_open_alarm(self, device_id: UUID, alarm_type: str, ts: int) -> Alarm | None:
        """Clear the open alarm of (device, type), if any (rules clearing)."""

        async def op(conn: Any) -> Alarm | None:
            async with conn.transaction():
                current = await self._open_row(conn, device_id, alarm_type)
                if current is None:
                    return None
                return await self._clear(conn, current, ts)

        return await self._store._run(op, retry=False)

    async def get_alarm(self, scope: Scope, alarm_id: UUID) -> Alarm:
        """One alarm visible in the scope."""

        async def op(conn: Any) -> Alarm:
            return await self._alarm_row(conn, scope, alarm_id)

        return await self._store._run(op)

    async def list_alarms(
        self, scope: Scope, where: AlarmFilter, limit: int, offset: int
    ) -> Page[Alarm]:
        """Alarms visible in the scope, newest first."""
        _common.check_page(limit, offset)
        clause, args = filter_sql(where, _dollar, scope, _same)

        async def op(conn: Any) -> Page[Alarm]:
            total = await conn.fetchval(f"SELECT count(*) FROM alarms {clause}", *args)
            n = len(args)
            rows = await conn.fetch(
                f"SELECT {ALARM_COLS} FROM alarms {clause}"
                f" ORDER BY start_ts DESC, id LIMIT ${n + 1} OFFSET ${n + 2}",
                *args,
                limit,
                offset,
            )
            return Page([_alarm(r) for r in rows], total)

        return await self._store._run(op)

    async def ack_alarm(self, scope: Scope, alarm_id: UUID, by: str, ts: int) -> AlarmChange:
        """Acknowledge an alarm (already acknowledged: unchanged)."""

        async def op(conn: Any) -> AlarmChange:
            async with conn.transaction():
                current = await self._alarm_row(conn, scope, alarm_id, lock=True)
                if current.acknowledged:
                    return current, None
                await conn.execute(
                    "UPDATE alarms SET acknowledged = true, ack_ts = $2, ack_by = $3 WHERE id = $1",
                    alarm_id,
                    ts,
                    by,
                )
                alarm = await self._alarm_row(conn, None, alarm_id)
                await self._notify(conn, "acked", alarm)
                return alarm, "acked"

        return await self._store._run(op, retry=False)

    async def clear_alarm(self, scope: Scope, alarm_id: UUID, ts: int) -> AlarmChange:
        """Clear an alarm by hand (already cleared: unchanged)."""

        async def op(conn: Any) -> AlarmChange:
            async with conn.transaction():
                current = await self._alarm_row(conn, scope, alarm_id, lock=True)
                if current.cleared:
                    return current, None
                return await self._clear(conn, current, ts), "cleared"

        return await self._store._run(op, retry=False)

    async def alarm_summary(self, scope: Scope, device_id: UUID | None) -> dict[str, int]:
        """Uncleared alarms per severity."""
        clause, args = filter_sql(AlarmFilter(device_id=device_id), _dollar, scope, _same)
        where = f"{clause} AND NOT cleared" if clause else "WHERE NOT cleared"

        async def op(conn: Any) -> dict[str, int]:
            rows = await conn.fetch(
                f"SELECT severity, count(*) FROM alarms {where} GROUP BY severity", *args
            )
            return {str(r[0]): int(r[1]) for r in rows}

        return await self._store._run(op)

    # --- webhooks ----------------------------------------------------------------------
    async def create_webhook(
        self, tenant_id: UUID, url: str, secret: str, events: tuple[str, ...]
    ) -> Webhook:
        """Register a webhook of a tenant."""
        hook = Webhook(uuid4(), tenant_id, url, secret, events, _common.now_ms())

        async def op(conn: Any) -> Webhook:
            try:
                await conn.execute(
                    f"INSERT INTO webhooks ({_WEBHOOK_COLS}) VALUES ($1, $2, $3, $4, $5, $6)",
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
            f"SELECT {_WEBHOOK_COLS} FROM webhooks"
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
            where = "WHERE ($1::uuid IS NULL OR tenant_id = $1)"
            total = await conn.fetchval(f"SELECT count(*) FROM webhooks {where}", scope)
            rows = await conn.fetch(
                f"SELECT {_WEBHOOK_COLS} FROM webhooks {where}"
                " ORDER BY created_at, id LIMIT $2 OFFSET $3",
                scope,
                limit,
                offset,
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
                f"SELECT {_DELIVERY_COLS} FROM webhook_deliveries WHERE webhook_id = $1"
                " ORDER BY id DESC LIMIT $2 OFFSET $3",
                webhook_id,
                limit,
                offset,
            )
            return Page([Delivery(*r) for r in rows], total)

        return await self._store._run(op)
