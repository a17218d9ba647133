"""Persistent MQTT sessions on PostgreSQL (a mixin of `PostgresStore`)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from uuid import UUID

from iiot.storage.base import Scope

__all__ = ["PostgresMqttSessions"]

T = TypeVar("T")


class PostgresMqttSessions:
    """Subscriptions of persistent MQTT sessions, by client id."""

    async def _run(self, op: Callable[[Any], Awaitable[T]], *, retry: bool = True) -> T:
        raise NotImplementedError

    async def get_mqtt_session(
        self, scope: Scope, client_id: str
    ) -> tuple[UUID, dict[str, int]] | None:
        """(device id, subscriptions) of a saved session visible in the scope."""

        async def op(conn: Any) -> tuple[UUID, dict[str, int]] | None:
            row = await conn.fetchrow(
                "SELECT s.device_id, s.subscriptions::text FROM mqtt_sessions s "
                "JOIN devices d ON d.id = s.device_id "
                "WHERE s.client_id = $1 AND ($2::uuid IS NULL OR d.tenant_id = $2)",
                client_id,
                scope,
            )
            return None if row is None else (row[0], json.loads(row[1]))

        return await self._run(op)

    async def save_mqtt_session(
        self, scope: Scope, client_id: str, device_id: UUID, subscriptions: dict[str, int]
    ) -> None:
        """Create or replace a session's subscriptions."""
        del scope  # the device comes from a login in this tenant; the row says which

        async def op(conn: Any) -> None:
            await conn.execute(
                "INSERT INTO mqtt_sessions (client_id, device_id, subscriptions, updated_at) "
                "VALUES ($1, $2, $3::jsonb, (extract(epoch FROM now()) * 1000)::bigint) "
                "ON CONFLICT (client_id) DO UPDATE SET device_id = excluded.device_id, "
                "subscriptions = excluded.subscriptions, updated_at = excluded.updated_at",
                client_id,
                device_id,
                json.dumps(subscriptions),
            )

        await self._run(op)

    async def delete_mqtt_session(self, scope: Scope, client_id: str) -> None:
        """Forget a session (a clean session starts)."""
        await self.delete_mqtt_sessions([(scope, client_id)])

    async def delete_mqtt_sessions(self, sessions: Sequence[tuple[Scope, str]]) -> None:
        """Forget several sessions, each (scope, client id), in one statement."""
        if not sessions:
            return

        async def op(conn: Any) -> None:
            await conn.execute(
                "DELETE FROM mqtt_sessions s USING devices d,"
                " unnest($1::text[], $2::uuid[]) AS x (client_id, tenant_id)"
                " WHERE s.client_id = x.client_id AND d.id = s.device_id"
                " AND (x.tenant_id IS NULL OR d.tenant_id = x.tenant_id)",
                [client_id for _, client_id in sessions],
                [scope for scope, _ in sessions],
            )

        await self._run(op)
