"""The `AlarmStore` interface: rules, rule state, alarms, webhooks and their outbox.

Kept apart from `Store` so that alarms grow without touching the telemetry store; both
implementations share the connection (SQLite) or pool (PostgreSQL) of the main store.
Every method that reads or changes tenant data takes the tenant scope first; an object
outside the scope raises `NotFound`, exactly as a missing one does.
"""

from __future__ import annotations

from typing import Any, Protocol
from uuid import UUID

from iiot.alarms.model import Alarm, AlarmFilter, Delivery, OutboxItem, Rule, Severity, Webhook
from iiot.storage.base import Page, Scope, Store

__all__ = ["AlarmChange", "AlarmStore", "alarm_store_for"]

# What a change did: "raised", "updated", "acked", "cleared", or None (nothing changed).
AlarmChange = tuple[Alarm, str | None]


class AlarmStore(Protocol):
    """Persistent alarms, rules and webhooks."""

    # --- rules -------------------------------------------------------------------------
    async def create_rule(self, tenant_id: UUID, spec: dict[str, Any]) -> Rule:
        """Store a validated rule; `Conflict` if its name is taken in the tenant."""
        ...

    async def get_rule(self, scope: Scope, rule_id: UUID) -> Rule:
        """One rule visible in the scope."""
        ...

    async def list_rules(self, scope: Scope, limit: int, offset: int) -> Page[Rule]:
        """Rules visible in the scope, by name."""
        ...

    async def replace_rule(self, scope: Scope, rule_id: UUID, spec: dict[str, Any]) -> Rule:
        """Replace a rule's specification (its evaluation state starts over)."""
        ...

    async def delete_rule(self, scope: Scope, rule_id: UUID) -> Rule:
        """Delete a rule with its evaluation state; returns what was deleted."""
        ...

    async def all_rules(self) -> list[Rule]:
        """Every rule of every tenant, for the evaluation engine."""
        ...

    async def rule_states(self) -> dict[tuple[UUID, UUID], dict[str, Any]]:
        """Every persisted (rule, device) evaluation state."""
        ...

    async def save_rule_state(self, rule_id: UUID, device_id: UUID, state: dict[str, Any]) -> None:
        """Persist one (rule, device) state (ignored when the rule or device is gone)."""
        ...

    # --- alarms ------------------------------------------------------------------------
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
        """Open an alarm, or update the open one of (device, type): never a second one.

        The update moves `end_ts` forward and escalates a lower severity ("updated");
        outbox rows for the tenant's webhooks are written in the same transaction.
        """
        ...

    async def clear_open_alarm(self, device_id: UUID, alarm_type: str, ts: int) -> Alarm | None:
        """Clear the open alarm of (device, type), if any (rules clearing)."""
        ...

    async def get_alarm(self, scope: Scope, alarm_id: UUID) -> Alarm:
        """One alarm visible in the scope."""
        ...

    async def list_alarms(
        self, scope: Scope, where: AlarmFilter, limit: int, offset: int
    ) -> Page[Alarm]:
        """Alarms visible in the scope, newest first."""
        ...

    async def ack_alarm(self, scope: Scope, alarm_id: UUID, by: str, ts: int) -> AlarmChange:
        """Acknowledge an alarm (already acknowledged: unchanged)."""
        ...

    async def clear_alarm(self, scope: Scope, alarm_id: UUID, ts: int) -> AlarmChange:
        """Clear an alarm by hand (already cleared: unchanged)."""
        ...

    async def alarm_summary(self, scope: Scope, device_id: UUID | None) -> dict[str, int]:
        """Uncleared alarms per severity."""
        ...

    # --- webhooks ----------------------------------------------------------------------
    async def create_webhook(
        self, tenant_id: UUID, url: str, secret: str, events: tuple[str, ...]
    ) -> Webhook:
        """Register a webhook of a tenant."""
        ...

    async def get_webhook(self, scope: Scope, webhook_id: UUID) -> Webhook:
        """One webhook visible in the scope."""
        ...

    async def list_webhooks(self, scope: Scope, limit: int, offset: int) -> Page[Webhook]:
        """Webhooks visible in the scope, oldest first."""
        ...

    async def delete_webhook(self, scope: Scope, webhook_id: UUID) -> None:
        """Delete a webhook with its outbox and delivery log."""
        ...

    async def enqueue_event(self, tenant_id: UUID, event: str, event_id: str, body: bytes) -> int:
        """Queue an event for every webhook of the tenant that wants it (once per event id)."""
        ...

    async def claim_outbox(self, now: int, limit: int, lease_ms: int) -> list[OutboxItem]:
        """Due outbox items, hidden from other senders for `lease_ms`."""
        ...

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
        ...

    async def next_outbox_due(self) -> int | None:
        """When the earliest pending outbox item is due (Unix ms), if any."""
        ...

    async def list_deliveries(
        self, scope: Scope, webhook_id: UUID, limit: int, offset: int
    ) -> Page[Delivery]:
        """A webhook's delivery attempts, newest first."""
        ...


def alarm_store_for(store: Store) -> AlarmStore:
    """The alarm store sharing the connection or pool of `store`."""
    # Imported lazily, as in open_store: each deployment loads only its own driver.
    if type(store).__name__ == "SqliteStore":
        from iiot.storage.sqlite import SqliteStore
        from iiot.storage.sqlite_alarms import SqliteAlarmStore

        assert isinstance(store, SqliteStore)
        return SqliteAlarmStore(store)
    from iiot.storage.pg_alarms import PostgresAlarmStore
    from iiot.storage.postgres import PostgresStore

    if not isinstance(store, PostgresStore):
        raise TypeError(f"no alarm store for {type(store).__name__}")
    return PostgresAlarmStore(store)
