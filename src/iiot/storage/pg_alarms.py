"""`PostgresAlarmStore`: alarms, rules and webhooks on the PostgreSQL store's pool.

The alarms are here; rules and webhooks with their outbox are mixins of their own
(`pg_alarm_rules`, `pg_webhooks`).

Raising is UPDATE-then-INSERT: when two processes insert the first alarm of a (device,
type) at once, the partial unique index `alarms_one_open` makes the second insert fail
and that writer updates the alarm the first one opened.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID, uuid4

import asyncpg

from iiot.alarms.model import Alarm, AlarmFilter, Severity
from iiot.errors import NotFound
from iiot.storage import _common
from iiot.storage.alarm_base import AlarmChange
from iiot.storage.alarm_common import (
    ALARM_COLS,
    alarm_event_body,
    alarm_of,
    as_is,
    filter_sql,
    rank,
)
from iiot.storage.base import Page, Scope
from iiot.storage.pg_alarm_rules import PostgresAlarmRules
from iiot.storage.pg_webhooks import PostgresWebhooks
from iiot.storage.postgres import PostgresStore
from iiot.storage.postgres_pool import one_snapshot

__all__ = ["PostgresAlarmStore"]

_ESCALATE = """
UPDATE alarms SET end_ts = greatest(end_ts, $2),
    severity = CASE WHEN $3 > severity_rank THEN $4 ELSE severity END,
    value = CASE WHEN $3 > severity_rank THEN $5::jsonb ELSE value END,
    rule_id = CASE WHEN $3 > severity_rank THEN $6 ELSE rule_id END,
    severity_rank = greatest(severity_rank, $3)
WHERE id = $1
"""


def _alarm(row: Any) -> Alarm:
    return alarm_of(row, as_is)


def _dollar(n: int) -> str:
    return f"${n}"


class PostgresAlarmStore(PostgresAlarmRules, PostgresWebhooks):
    """The `AlarmStore` on an open `PostgresStore`."""

    def __init__(self, store: PostgresStore) -> None:
        """Share the store's pool."""
        self._store = store

    # --- alarms ------------------------------------------------------------------------
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
        clause, args = filter_sql(where, _dollar, scope, as_is)

        async def op(conn: Any) -> Page[Alarm]:
            async with one_snapshot(conn):
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
        clause, args = filter_sql(AlarmFilter(device_id=device_id), _dollar, scope, as_is)
        where = f"{clause} AND NOT cleared" if clause else "WHERE NOT cleared"

        async def op(conn: Any) -> dict[str, int]:
            rows = await conn.fetch(
                f"SELECT severity, count(*) FROM alarms {where} GROUP BY severity", *args
            )
            return {str(r[0]): int(r[1]) for r in rows}

        return await self._store._run(op)
