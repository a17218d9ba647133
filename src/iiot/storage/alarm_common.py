"""Helpers shared by the SQLite and PostgreSQL alarm stores."""

from __future__ import annotations

import json
import uuid
from typing import Any
from uuid import UUID

from iiot.alarms.model import (
    SEVERITY_RANK,
    Alarm,
    AlarmFilter,
    AlarmStatus,
    Rule,
    Severity,
    Webhook,
    event_body,
)

__all__ = [
    "ALARM_COLS",
    "DELIVERY_COLS",
    "RULE_COLS",
    "WEBHOOK_COLS",
    "alarm_event_body",
    "alarm_of",
    "as_is",
    "events_text",
    "filter_sql",
    "new_event_id",
    "rank",
    "rule_of",
    "webhook_of",
]

ALARM_COLS = (
    "id, tenant_id, device_id, type, severity, acknowledged, cleared, start_ts, end_ts,"
    " ack_ts, ack_by, clear_ts, value, rule_id, details"
)
RULE_COLS = "id, tenant_id, spec, created_at, updated_at"
WEBHOOK_COLS = "id, tenant_id, url, secret, events, created_at"
DELIVERY_COLS = (
    "id, webhook_id, event, event_id, attempt, ts, status_code, error, duration_ms, outcome"
)


def rank(severity: Severity) -> int:
    """The severity's rank (higher escalates)."""
    return SEVERITY_RANK[Severity(severity)]


def _json(raw: Any) -> Any:
    if raw is None:
        return None
    if isinstance(raw, bytes | str):
        return json.loads(raw)
    return raw


def alarm_of(row: Any, as_uuid: Any) -> Alarm:
    """An alarm from a row in ALARM_COLS order; `as_uuid` converts the id columns."""
    return Alarm(
        id=as_uuid(row[0]),
        tenant_id=as_uuid(row[1]),
        device_id=as_uuid(row[2]),
        type=row[3],
        severity=Severity(row[4]),
        acknowledged=bool(row[5]),
        cleared=bool(row[6]),
        start_ts=int(row[7]),
        end_ts=int(row[8]),
        ack_ts=row[9],
        ack_by=row[10],
        clear_ts=row[11],
        value=_json(row[12]),
        rule_id=None if row[13] is None else as_uuid(row[13]),
        details=_json(row[14]) or {},
    )


def as_is(value: Any) -> Any:
    """Ids as the driver gives them (asyncpg: `UUID` already), for `as_uuid` arguments."""
    return value


def rule_of(row: Any, as_uuid: Any) -> Rule:
    """A rule from a row in RULE_COLS order; `as_uuid` converts the id columns."""
    return Rule(as_uuid(row[0]), as_uuid(row[1]), json.loads(row[2]), row[3], row[4])


def webhook_of(row: Any, as_uuid: Any) -> Webhook:
    """A webhook from a row in WEBHOOK_COLS order; `as_uuid` converts the id columns."""
    events = tuple(e for e in row[4].split(",") if e)
    return Webhook(as_uuid(row[0]), as_uuid(row[1]), row[2], row[3], events, row[5])


def events_text(events: tuple[str, ...]) -> str:
    """Event names as stored: ',a,b,' so that ',a,' finds one."""
    return "," + ",".join(events) + ","


def new_event_id() -> str:
    """A unique id for one event (receivers deduplicate on it)."""
    return uuid.uuid4().hex


def alarm_event_body(kind: str, alarm: Alarm, ts: int) -> tuple[str, str, bytes]:
    """(event name, event id, body) of an alarm change."""
    event_id = new_event_id()
    event = f"alarm.{kind}"
    return event, event_id, event_body(event_id, event, ts, alarm.tenant_id, alarm.to_json())


def filter_sql(
    where: AlarmFilter, param: Any, scope: UUID | None, conv: Any
) -> tuple[str, list[Any]]:
    """WHERE clause and arguments of an alarm list; `param(n)` renders placeholder n."""
    clauses: list[str] = []
    args: list[Any] = []

    def add(sql: str, value: Any) -> None:
        args.append(value)
        clauses.append(sql.replace("?", param(len(args))))

    if scope is not None:
        add("tenant_id = ?", conv(scope))
    if where.device_id is not None:
        add("device_id = ?", conv(where.device_id))
    if where.type is not None:
        add("type = ?", where.type)
    if where.start is not None:
        add("start_ts >= ?", where.start)
    if where.end is not None:
        add("start_ts < ?", where.end)
    if where.severities:
        parts = []
        for severity in where.severities:
            args.append(severity.value)
            parts.append(f"severity = {param(len(args))}")
        clauses.append("(" + " OR ".join(parts) + ")")
    if where.statuses:
        parts = []
        for status in where.statuses:
            cleared = status in (AlarmStatus.CLEARED_ACK, AlarmStatus.CLEARED_UNACK)
            acked = status in (AlarmStatus.ACTIVE_ACK, AlarmStatus.CLEARED_ACK)
            parts.append(
                f"({'' if cleared else 'NOT '}cleared AND {'' if acked else 'NOT '}acknowledged)"
            )
        clauses.append("(" + " OR ".join(parts) + ")")
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", args
