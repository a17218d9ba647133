"""Alarm rules and their evaluation state on PostgreSQL (a `PostgresAlarmStore` mixin)."""

from __future__ import annotations

import contextlib
import json
from typing import Any
from uuid import UUID, uuid4

import asyncpg

from iiot.alarms.model import Rule
from iiot.errors import Conflict, NotFound
from iiot.storage import _common
from iiot.storage.alarm_common import RULE_COLS, as_is, rule_of
from iiot.storage.base import Page, Scope
from iiot.storage.postgres import PostgresStore
from iiot.storage.postgres_pool import scoped_page

__all__ = ["PostgresAlarmRules"]


def _rule(row: Any) -> Rule:
    return rule_of(row, as_is)


class PostgresAlarmRules:
    """The rule methods of `PostgresAlarmStore` (on the store's pool)."""

    _store: PostgresStore

    # --- rules -------------------------------------------------------------------------
    async def create_rule(self, tenant_id: UUID, spec: dict[str, Any]) -> Rule:
        """Store a validated rule; `Conflict` if its name is taken in the tenant."""
        now = _common.now_ms()
        rule = Rule(uuid4(), tenant_id, spec, now, now)

        async def op(conn: Any) -> Rule:
            try:
                await conn.execute(
                    f"INSERT INTO alarm_rules ({RULE_COLS}, name)"
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
            f"SELECT {RULE_COLS} FROM alarm_rules"
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
            rows, total = await scoped_page(
                conn, "alarm_rules", RULE_COLS, "tenant_id", "name, id", scope, (limit, offset)
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
            return [_rule(r) for r in await conn.fetch(f"SELECT {RULE_COLS} FROM alarm_rules")]

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
