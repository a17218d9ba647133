"""`AlarmService`: every alarm change goes through here, from rules, REST and OPC UA.

The store writes the change and its webhook outbox rows in one transaction; this service
then tells the live bus (`RecordEvent("alarm", kind, ...)`) and local listeners (the AMQP
publisher, OPC UA conditions, the webhook sender's wake-up).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from uuid import UUID

from iiot.alarms.model import Alarm, AlarmFilter, Rule, Severity
from iiot.bus import LiveBus, RecordEvent
from iiot.storage import _common
from iiot.storage.alarm_base import AlarmStore
from iiot.storage.base import Page, Scope

__all__ = ["AlarmService"]

log = logging.getLogger(__name__)

Listener = Callable[[RecordEvent], None]


class AlarmService:
    """Alarm and rule changes with their notifications."""

    def __init__(self, store: AlarmStore, bus: LiveBus) -> None:
        """Wrap the alarm store; changes are announced on the bus."""
        self.store = store
        self._bus = bus
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        """Also call `listener` with every alarm change made in this process."""
        self._listeners.append(listener)

    def unlisten(self, listener: Listener) -> None:
        """Stop calling `listener`."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _announce(self, kind: str, alarm: Alarm) -> None:
        event = RecordEvent("alarm", kind, alarm.tenant_id, alarm.device_id, alarm.to_json())
        self._bus.publish(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # one broken listener must not stop the others
                log.exception("alarm listener failed")

    def announce_rule(self, kind: str, rule: Rule) -> None:
        """Tell the bus (engines in every process, the console) that a rule changed."""
        device_id = rule.device_id
        self._bus.publish(RecordEvent("rule", kind, rule.tenant_id, device_id, rule.to_json()))

    async def raise_alarm(
        self,
        tenant_id: UUID,
        device_id: UUID,
        alarm_type: str,
        severity: Severity,
        ts: int,
        value: Any,
        rule_id: UUID | None,
        details: dict[str, Any] | None = None,
    ) -> Alarm:
        """Open or update the alarm of (device, type)."""
        alarm, kind = await self.store.raise_alarm(
            tenant_id, device_id, alarm_type, severity, ts, value, rule_id, details or {}
        )
        if kind is not None:
            self._announce(kind, alarm)
        return alarm

    async def clear_open(self, device_id: UUID, alarm_type: str, ts: int) -> Alarm | None:
        """Clear the open alarm of (device, type), if any."""
        alarm = await self.store.clear_open_alarm(device_id, alarm_type, ts)
        if alarm is not None:
            self._announce("cleared", alarm)
        return alarm

    async def ack(self, scope: Scope, alarm_id: UUID, by: str) -> Alarm:
        """Acknowledge an alarm (idempotent)."""
        alarm, kind = await self.store.ack_alarm(scope, alarm_id, by, _common.now_ms())
        if kind is not None:
            self._announce(kind, alarm)
        return alarm

    async def clear(self, scope: Scope, alarm_id: UUID) -> Alarm:
        """Clear an alarm by hand (idempotent)."""
        alarm, kind = await self.store.clear_alarm(scope, alarm_id, _common.now_ms())
        if kind is not None:
            self._announce(kind, alarm)
        return alarm

    async def get(self, scope: Scope, alarm_id: UUID) -> Alarm:
        """One alarm."""
        return await self.store.get_alarm(scope, alarm_id)

    async def list(self, scope: Scope, where: AlarmFilter, limit: int, offset: int) -> Page[Alarm]:
        """Alarms, newest first."""
        return await self.store.list_alarms(scope, where, limit, offset)
