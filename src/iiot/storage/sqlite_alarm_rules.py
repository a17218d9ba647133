"""Alarm rules and their evaluation state on SQLite (a `SqliteAlarmStore` mixin)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from typing import Any
from uuid import UUID, uuid4

from iiot.alarms.model import Rule
from iiot.errors import Conflict, NotFound
from iiot.storage import _common
from iiot.storage.alarm_common import RULE_COLS, rule_of
from iiot.storage.base import Page, Scope
from iiot.storage.sqlite_alarm_part import SqliteAlarmPart, _scoped, _uuid
from iiot.storage.sqlite_sql import _transaction

__all__ = ["SqliteAlarmRules"]


def _rule(row: Any) -> Rule:
    return rule_of(row, _uuid)


class SqliteAlarmRules(SqliteAlarmPart):
    """The rule methods of `SqliteAlarmStore`."""

    # --- rules -------------------------------------------------------------------------
    async def create_rule(self, tenant_id: UUID, spec: dict[str, Any]) -> Rule:
        """Store a validated rule; `Conflict` if its name is taken in the tenant."""

        def run() -> Rule:
            now = _common.now_ms()
            rule = Rule(uuid4(), tenant_id, spec, now, now)
            try:
                self._db.execute(
                    f"INSERT INTO alarm_rules ({RULE_COLS}, name) VALUES (?, ?, ?, ?, ?, ?)",
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
            f"SELECT {RULE_COLS} FROM alarm_rules WHERE id = ?{extra}", (rule_id.bytes, *args)
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
                f"SELECT {RULE_COLS} FROM alarm_rules {where} ORDER BY name, id LIMIT ? OFFSET ?",
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
            rows = self._db.execute(f"SELECT {RULE_COLS} FROM alarm_rules").fetchall()
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
