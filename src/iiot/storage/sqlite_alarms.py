"""`SqliteAlarmStore`: alarms, rules and webhooks on the SQLite store's own connection.

The alarms are here; rules and webhooks with their outbox are mixins of their own
(`sqlite_alarm_rules`, `sqlite_webhooks`).

Each method runs on the store's single worker thread as one function, so a transaction
never interleaves with another; `BEGIN IMMEDIATE` serializes writers of other processes.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any
from uuid import UUID, uuid4

from iiot.alarms.model import Alarm, AlarmFilter, Severity
from iiot.errors import NotFound
from iiot.storage import _common
from iiot.storage.alarm_base import AlarmChange
from iiot.storage.alarm_common import (
    ALARM_COLS,
    alarm_event_body,
    alarm_of,
    filter_sql,
    rank,
)
from iiot.storage.base import Page, Scope
from iiot.storage.sqlite_alarm_part import _scoped, _uuid
from iiot.storage.sqlite_alarm_rules import SqliteAlarmRules
from iiot.storage.sqlite_sql import _transaction
from iiot.storage.sqlite_webhooks import SqliteWebhooks

__all__ = ["SqliteAlarmStore"]


def _alarm(row: Any) -> Alarm:
    return alarm_of(row, _uuid)


class SqliteAlarmStore(SqliteAlarmRules, SqliteWebhooks):
    """The `AlarmStore` on an open `SqliteStore` (sharing its connection and worker thread)."""

    # --- alarms ------------------------------------------------------------------------
    def _notify(self, kind: str, alarm: Alarm) -> None:
        now = _common.now_ms()
        event, event_id, body = alarm_event_body(kind, alarm, now)
        self._enqueue(alarm.tenant_id, event, event_id, body, now)

    def _open_row(self, device_id: UUID, alarm_type: str) -> Alarm | None:
        row = self._db.execute(
            f"SELECT {ALARM_COLS} FROM alarms WHERE device_id = ? AND type = ? AND cleared = 0",
            (device_id.bytes, alarm_type),
        ).fetchone()
        return None if row is None else _alarm(row)

    def _alarm_row(self, scope: Scope, alarm_id: UUID) -> Alarm:
        extra, args = _scoped(scope)
        row = self._db.execute(
            f"SELECT {ALARM_COLS} FROM alarms WHERE id = ?{extra}", (alarm_id.bytes, *args)
        ).fetchone()
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

        def update(current: Alarm) -> AlarmChange:
            escalate = level > rank(current.severity)
            self._db.execute(
                "UPDATE alarms SET end_ts = max(end_ts, ?),"
                " severity = CASE WHEN ? THEN ? ELSE severity END,"
                " severity_rank = max(severity_rank, ?),"
                " value = CASE WHEN ? THEN ? ELSE value END,"
                " rule_id = CASE WHEN ? THEN ? ELSE rule_id END"
                " WHERE id = ?",
                (
                    ts,
                    escalate,
                    severity.value,
                    level,
                    escalate,
                    json.dumps(value),
                    escalate,
                    None if rule_id is None else rule_id.bytes,
                    current.id.bytes,
                ),
            )
            alarm = self._alarm_row(None, current.id)
            if escalate:
                self._notify("updated", alarm)
            return alarm, "updated" if escalate else None

        def run() -> AlarmChange:
            with _transaction(self._db):
                current = self._open_row(device_id, alarm_type)
                if current is not None:
                    return update(current)
                alarm_id = uuid4()
                try:
                    self._db.execute(
                        f"INSERT INTO alarms ({ALARM_COLS}, severity_rank) VALUES"
                        " (?, ?, ?, ?, ?, 0, 0, ?, ?, NULL, NULL, NULL, ?, ?, ?, ?)",
                        (
                            alarm_id.bytes,
                            tenant_id.bytes,
                            device_id.bytes,
                            alarm_type,
                            severity.value,
                            ts,
                            ts,
                            json.dumps(value),
                            None if rule_id is None else rule_id.bytes,
                            json.dumps(details),
                            level,
                        ),
                    )
                except sqlite3.IntegrityError as exc:
                    if "FOREIGN KEY" in str(exc):
                        raise NotFound(f"device {device_id} not found") from exc
                    # Another writer opened it first: the unique index decided.
                    current = self._open_row(device_id, alarm_type)
                    if current is None:
                        raise
                    return update(current)
                alarm = self._alarm_row(None, alarm_id)
                self._notify("raised", alarm)
                return alarm, "raised"

        return await self._store._call(run)

    async def clear_open_alarm(self, device_id: UUID, alarm_type: str, ts: int) -> Alarm | None:
        """Clear the open alarm of (device, type), if any (rules clearing)."""

        def run() -> Alarm | None:
            with _transaction(self._db):
                current = self._open_row(device_id, alarm_type)
                if current is None:
                    return None
                return self._clear(current, ts)

        return await self._store._call(run)

    def _clear(self, current: Alarm, ts: int) -> Alarm:
        self._db.execute(
            "UPDATE alarms SET cleared = 1, clear_ts = ? WHERE id = ?", (ts, current.id.bytes)
        )
        alarm = self._alarm_row(None, current.id)
        self._notify("cleared", alarm)
        return alarm

    async def get_alarm(self, scope: Scope, alarm_id: UUID) -> Alarm:
        """One alarm visible in the scope."""
        return await self._store._call(self._alarm_row, scope, alarm_id)

    async def list_alarms(
        self, scope: Scope, where: AlarmFilter, limit: int, offset: int
    ) -> Page[Alarm]:
        """Alarms visible in the scope, newest first."""
        _common.check_page(limit, offset)
        clause, args = filter_sql(where, lambda n: "?", scope, lambda u: u.bytes)

        def run() -> Page[Alarm]:
            total = self._db.execute(f"SELECT count(*) FROM alarms {clause}", args).fetchone()
            rows = self._db.execute(
                f"SELECT {ALARM_COLS} FROM alarms {clause}"
                " ORDER BY start_ts DESC, id LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
            return Page([_alarm(r) for r in rows], total[0])

        return await self._store._call(run)

    async def ack_alarm(self, scope: Scope, alarm_id: UUID, by: str, ts: int) -> AlarmChange:
        """Acknowledge an alarm (already acknowledged: unchanged)."""

        def run() -> AlarmChange:
            with _transaction(self._db):
                current = self._alarm_row(scope, alarm_id)
                if current.acknowledged:
                    return current, None
                self._db.execute(
                    "UPDATE alarms SET acknowledged = 1, ack_ts = ?, ack_by = ? WHERE id = ?",
                    (ts, by, alarm_id.bytes),
                )
                alarm = self._alarm_row(None, alarm_id)
                self._notify("acked", alarm)
                return alarm, "acked"

        return await self._store._call(run)

    async def clear_alarm(self, scope: Scope, alarm_id: UUID, ts: int) -> AlarmChange:
        """Clear an alarm by hand (already cleared: unchanged)."""

        def run() -> AlarmChange:
            with _transaction(self._db):
                current = self._alarm_row(scope, alarm_id)
                if current.cleared:
                    return current, None
                return self._clear(current, ts), "cleared"

        return await self._store._call(run)

    async def alarm_summary(self, scope: Scope, device_id: UUID | None) -> dict[str, int]:
        """Uncleared alarms per severity."""
        clause, args = filter_sql(AlarmFilter(device_id=device_id), lambda n: "?", scope, _b)

        def run() -> dict[str, int]:
            where = f"{clause} AND cleared = 0" if clause else "WHERE cleared = 0"
            rows = self._db.execute(
                f"SELECT severity, count(*) FROM alarms {where} GROUP BY severity", args
            ).fetchall()
            return {str(r[0]): int(r[1]) for r in rows}

        return await self._store._call(run)


def _b(value: UUID) -> bytes:
    return value.bytes
