"""Alarm, rule and webhook records as they cross layers, and their REST representations."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

__all__ = [
    "SEVERITY_RANK",
    "Alarm",
    "AlarmFilter",
    "AlarmStatus",
    "Delivery",
    "OutboxItem",
    "Rule",
    "Severity",
    "Webhook",
    "event_body",
]


class Severity(enum.StrEnum):
    """ThingsBoard's severities, highest first."""

    CRITICAL = "CRITICAL"
    MAJOR = "MAJOR"
    MINOR = "MINOR"
    WARNING = "WARNING"
    INDETERMINATE = "INDETERMINATE"


# A higher rank escalates an open alarm in place.
SEVERITY_RANK = {
    Severity.CRITICAL: 5,
    Severity.MAJOR: 4,
    Severity.MINOR: 3,
    Severity.WARNING: 2,
    Severity.INDETERMINATE: 1,
}


class AlarmStatus(enum.StrEnum):
    """Whether the alarm is still active and whether an operator acknowledged it."""

    ACTIVE_UNACK = "ACTIVE_UNACK"
    ACTIVE_ACK = "ACTIVE_ACK"
    CLEARED_UNACK = "CLEARED_UNACK"
    CLEARED_ACK = "CLEARED_ACK"

    @staticmethod
    def of(cleared: bool, acknowledged: bool) -> AlarmStatus:
        """The status from the two flags the database keeps."""
        prefix = "CLEARED" if cleared else "ACTIVE"
        return AlarmStatus(f"{prefix}_{'ACK' if acknowledged else 'UNACK'}")


@dataclass(frozen=True, slots=True)
class Alarm:
    """One alarm of one device; at most one uncleared per (device, type)."""

    id: UUID
    tenant_id: UUID
    device_id: UUID
    type: str
    severity: Severity
    acknowledged: bool
    cleared: bool
    start_ts: int
    end_ts: int
    ack_ts: int | None = None
    ack_by: str | None = None
    clear_ts: int | None = None
    value: Any = None
    rule_id: UUID | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> AlarmStatus:
        """ACTIVE_UNACK, ACTIVE_ACK, CLEARED_UNACK or CLEARED_ACK."""
        return AlarmStatus.of(self.cleared, self.acknowledged)

    def to_json(self) -> dict[str, Any]:
        """The REST representation."""
        return {
            "id": str(self.id),
            "tenant_id": str(self.tenant_id),
            "device_id": str(self.device_id),
            "type": self.type,
            "severity": self.severity.value,
            "status": self.status.value,
            "start_ts": self.start_ts,
            "end_ts": self.end_ts,
            "ack_ts": self.ack_ts,
            "ack_by": self.ack_by,
            "clear_ts": self.clear_ts,
            "value": self.value,
            "rule_id": None if self.rule_id is None else str(self.rule_id),
            "details": self.details,
        }


@dataclass(frozen=True, slots=True)
class AlarmFilter:
    """Filters of an alarm list; None means any."""

    device_id: UUID | None = None
    statuses: tuple[AlarmStatus, ...] | None = None
    severities: tuple[Severity, ...] | None = None
    type: str | None = None
    start: int | None = None  # start_ts >= start
    end: int | None = None  # start_ts < end


@dataclass(frozen=True, slots=True)
class Rule:
    """A stored rule: its validated specification (the REST body) plus identity."""

    id: UUID
    tenant_id: UUID
    spec: dict[str, Any]
    created_at: int
    updated_at: int

    @property
    def name(self) -> str:
        """The rule's name (unique within its tenant)."""
        return str(self.spec["name"])

    @property
    def enabled(self) -> bool:
        """Whether the engine evaluates this rule."""
        return bool(self.spec.get("enabled", True))

    @property
    def device_id(self) -> UUID | None:
        """The one device the rule targets, if it targets one."""
        raw = self.spec["target"].get("device_id")
        return None if raw is None else UUID(str(raw))

    @property
    def device_type(self) -> str | None:
        """The device type the rule targets, if it targets a type."""
        raw = self.spec["target"].get("device_type")
        return None if raw is None else str(raw)

    def to_json(self) -> dict[str, Any]:
        """The REST representation."""
        return {
            "id": str(self.id),
            "tenant_id": str(self.tenant_id),
            **self.spec,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True, slots=True)
class Webhook:
    """Where a tenant's events are POSTed, signed with the webhook's secret."""

    id: UUID
    tenant_id: UUID
    url: str
    secret: str
    events: tuple[str, ...]
    created_at: int

    def to_json(self) -> dict[str, Any]:
        """The REST representation (never the secret)."""
        return {
            "id": str(self.id),
            "tenant_id": str(self.tenant_id),
            "url": self.url,
            "events": list(self.events),
            "created_at": self.created_at,
        }


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One event waiting to be delivered to one webhook."""

    id: int
    webhook_id: UUID
    url: str
    secret: str
    event: str
    event_id: str
    body: bytes
    attempts: int
    created_at: int


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery attempt, as the delivery log shows it."""

    id: int
    webhook_id: UUID
    event: str
    event_id: str
    attempt: int
    ts: int
    status_code: int | None
    error: str | None
    duration_ms: int
    outcome: str  # "delivered", "retrying", "abandoned"

    def to_json(self) -> dict[str, Any]:
        """The REST representation."""
        return {
            "id": self.id,
            "webhook_id": str(self.webhook_id),
            "event": self.event,
            "event_id": self.event_id,
            "attempt": self.attempt,
            "ts": self.ts,
            "status_code": self.status_code,
            "error": self.error,
            "duration_ms": self.duration_ms,
            "outcome": self.outcome,
        }


def event_body(event_id: str, event: str, ts: int, tenant_id: UUID, data: Any) -> bytes:
    """The exact bytes POSTed (and signed) for one event."""
    body = {"id": event_id, "event": event, "ts": ts, "tenant_id": str(tenant_id), "data": data}
    return json.dumps(body, separators=(",", ":"), default=str).encode()
