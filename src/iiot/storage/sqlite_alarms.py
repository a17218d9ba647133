"""`SqliteAlarmStore`: alarms, rules and webhooks on the SQLite store's own connection.

Each method runs on the store's single worker thread as one function, so a transaction
never interleaves with another; `BEGIN IMMEDIATE` serializes writers of other processes.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from typing import Any
from uuid import UUID, uuid4

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
from iiot.storage.sqlite import SqliteStore
from iiot.storage.sqlite_sql import _transaction

__all__ = ["SqliteAlarmStore"]

_RULE_COLS = "id, tenant_id, spec, created_at, updated_at"
_WEBHOOK_COLS = "id, tenant_id, url, secret, events, created_at"
_DELIVERY_COLS = (
    "id, webhook_id, event, event_id, attempt, ts, status_code, error, duration_ms, outcome"
)


def _uuid(raw: bytes) -> UUID:
    return UUID(bytes=raw)


def _rule(row: Any) -> Rule:
    return Rule(UUID(bytes=row[0]), UUID(bytes=row[1]), json.loads(row[2]), row[3], row[4])


def _webhook(row: Any) -> Webhook:
    events = tuple(e for e in row[4].split(",") if e)
    return Webhook(UUID(bytes=row[0]), UUID(bytes=row[1]), row[2], row[3], events, row[5])


def _alarm(row: Any) -> Alarm:
    return alarm_of(row, _uuid)


def _scoped(scope: Scope, column: str = "tenant_id") -> tuple[str, tuple[Any, ...]]:
    return ("", ()) if scope is None else (f" AND {column} = ?", (scope.bytes,))


class SqliteAlarmStore:
    """The `AlarmStore` on an open `SqliteStore`."""

    def __init__(self, store: SqliteStore) -> None:
        """Share the store's connection and worker thread."""
        self._store = store

    @property
    def _db(self) -> sqlite3.Connection:
        return self._store._db

    # --- rules -------------------------------------------------------------------------
    async def create_rule(self, tenant_id: UUID, spec: dict[str, Any]) -> Rule:
        """Store a validated rule; `Conflict` if its name is taken in the tenant."""

        def run() -> Rule:
            now = _common.now_ms()
            rule = Rule(uuid4(), tenant_id, spec, now, now)
            try:
                self._db.execute(
                    f"INSERT INTO alarm_rules ({_RULE_COLS}, name) VALUES (?, ?, ?, ?, ?, ?)",
                    (rule.id.bytes, tenant_id.bytes, json.dumps(spec), now, now, rule.name),
                )
            except sqlite3.IntegrityError as exc:
                if "FOREIGN KEY" in str(exc):
                    raise NotFound(f"tenant {tenant_id} not found") from exc
                raise Conflict(f"a rule named {rule.name!r} already exists") from exc
            return rule

        return await self._store._call(run)

    def _rule_row(self, scope: Scope, rule_id: UUID) -> Rule:
        extra, args = _scoped(scope)
        row = self._db.execute(
            f"SELECT {_RULE_COLS} FROM alarm_rules WHERE id = ?{extra}", (rule_id.bytes, *args)
        ).fetchone()
        if row is None:
            raise NotFound(f"rule {rule_id} not found")
        return _rule(row)

    async def get_rule(self, scope: Scope, rule_id: UUID) -> Rule:
        """One rule visible in the scope."""
        return await self._store._call(self._rule_row, scope, rule_id)

    async def list_rules(self, scope: Scope, limit: int, offset: int) -> Page[Rule]:
        """Rules visible in the scope, by name."""
        _common.check_page(limit, offset)

        def run() -> Page[Rule]:
            where, args = ("", ()) if scope is None else ("WHERE tenant_id = ?", (scope.bytes,))
            total = self._db.execute(f"SELECT count(*) FROM alarm_rules {where}", args).fetchone()
            rows = self._db.execute(
                f"SELECT {_RULE_COLS} FROM alarm_rules {where} ORDER BY name, id LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
            return Page([_rule(r) for r in rows], total[0])

        return await self._store._call(run)

    async def replace_rule(self, scope: Scope, rule_id: UUID, spec: dict[str, Any]) -> Rule:
        """Replace a rule's specification (its evaluation state starts over)."""

        def run() -> Rule:
            with _transaction(self._db):
                current = self._rule_row(scope, rule_id)
                try:
                    self._db.execute(
                        "UPDATE alarm_rules SET spec = ?, name = ?, updated_at = ? WHERE id = ?",
                        (json.dumps(spec), spec["name"], _common.now_ms(), rule_id.bytes),
                    )
                except sqlite3.IntegrityError as exc:
                    raise Conflict(f"a rule named {spec['name']!r} already exists") from exc
                self._db.execute(
                    "DELETE FROM alarm_rule_state WHERE rule_id = ?", (current.id.bytes,)
                )
                return self._rule_row(scope, rule_id)

        return await self._store._call(run)

    async def delete_rule(self, scope: Scope, rule_id: UUID) -> Rule:
        """Delete a rule with its evaluation state; returns what was deleted."""

        def run() -> Rule:
            with _transaction(self._db):
                rule = self._rule_row(scope, rule_id)
                self._db.execute("DELETE FROM alarm_rules WHERE id = ?", (rule_id.bytes,))
                return rule

        return await self._store._call(run)

    async def all_rules(self) -> list[Rule]:
        """Every rule of every tenant, for the evaluation engine."""

        def run() -> list[Rule]:
            rows = self._db.execute(f"SELECT {_RULE_COLS} FROM alarm_rules").fetchall()
            return [_rule(r) for r in rows]

        return await self._store._call(run)

    async def rule_states(self) -> dict[tuple[UUID, UUID], dict[str, Any]]:
        """Every persisted (rule, device) evaluation state."""

        def run() -> dict[tuple[UUID, UUID], dict[str, Any]]:
            rows = self._db.execute("SELECT rule_id, device_id, state FROM alarm_rule_state")
            return {(_uuid(r[0]), _uuid(r[1])): json.loads(r[2]) for r in rows}

        return await self._store._call(run)

    async def save_rule_state(self, rule_id: UUID, device_id: UUID, state: dict[str, Any]) -> None:
        """Persist one (rule, device) state (ignored when the rule or device is gone)."""

        def run() -> None:
            # The rule or the device was deleted meanwhile: nothing to record.
            with contextlib.suppress(sqlite3.IntegrityError):
                self._db.execute(
                    "INSERT INTO alarm_rule_state (rule_id, device_id, state, updated_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (rule_id, device_id) DO UPDATE"
                    " SET state = excluded.state, updated_at = excluded.updated_at",
                    (rule_id.bytes, device_id.bytes, json.dumps(state), _common.now_ms()),
                )

        await self._store._call(run)

    # --- alarms ------------------------------------------------------------------------
    def _enqueue(self, tenant_id: UUID, event: str, event_id: str, body: bytes, now: int) -> int:
        cursor = self._db.execute(
            "INSERT INTO webhook_outbox (webhook_id, event, event_id, body, created_at,"
            " next_attempt_at) SELECT id, ?, ?, ?, ?, ? FROM webhooks"
            " WHERE tenant_id = ? AND instr(events, ',' || ? || ',') > 0"
            " ON CONFLICT (webhook_id, event_id) DO NOTHING",
            (event, event_id, body, now, now, tenant_id.bytes, event),
        )
        return cursor.rowcount

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

    # --- webhooks ----------------------------------------------------------------------
    async def create_webhook(
        self, tenant_id: UUID, url: str, secret: str, events: tuple[str, ...]
    ) -> Webhook:
        """Register a webhook of a tenant."""

        def run() -> Webhook:
            hook = Webhook(uuid4(), tenant_id, url, secret, events, _common.now_ms())
            try:
                self._db.execute(
                    f"INSERT INTO webhooks ({_WEBHOOK_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
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
            f"SELECT {_WEBHOOK_COLS} FROM webhooks WHERE id = ?{extra}", (webhook_id.bytes, *args)
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
                f"SELECT {_WEBHOOK_COLS} FROM webhooks {where}"
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
                    f"INSERT INTO webhook_deliveries ({_DELIVERY_COLS})"
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
                f"SELECT {_DELIVERY_COLS} FROM webhook_deliveries WHERE webhook_id = ?"
                " ORDER BY id DESC LIMIT ? OFFSET ?",
                (webhook_id.bytes, limit, offset),
            ).fetchall()
            return Page(
                [Delivery(r[0], _uuid(r[1]), *r[2:]) for r in rows],
                total[0],
            )

        return await self._store._call(run)


def _b(value: UUID) -> bytes:
    return value.bytes
