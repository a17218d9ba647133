"""Persistent MQTT sessions on SQLite (a mixin of `SqliteStore`)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TypeVar
from uuid import UUID

from iiot.storage.base import Scope
from iiot.storage.sqlite_sql import SqlitePart, _transaction

__all__ = ["SqliteMqttSessions"]

T = TypeVar("T")

# The session's device must be visible in the scope (None: every tenant).
_SCOPED = "d.id = s.device_id AND (? IS NULL OR d.tenant_id = ?)"


class SqliteMqttSessions(SqlitePart):
    """Subscriptions of persistent MQTT sessions, by client id."""

    async def get_mqtt_session(
        self, scope: Scope, client_id: str
    ) -> tuple[UUID, dict[str, int]] | None:
        """(device id, subscriptions) of a saved session visible in the scope."""
        tenant = scope.bytes if scope else None

        def read() -> tuple[UUID, dict[str, int]] | None:
            row = self._db.execute(
                f"SELECT s.device_id, s.subscriptions FROM mqtt_sessions s, devices d "
                f"WHERE s.client_id = ? AND {_SCOPED}",
                (client_id, tenant, tenant),
            ).fetchone()
            return None if row is None else (UUID(bytes=row[0]), json.loads(row[1]))

        return await self._call(read)

    async def save_mqtt_session(
        self, scope: Scope, client_id: str, device_id: UUID, subscriptions: dict[str, int]
    ) -> None:
        """Create or replace a session's subscriptions."""
        del scope  # the device comes from a login in this tenant; the row says which
        body = json.dumps(subscriptions)
        now = int(time.time() * 1000)

        def write() -> None:
            with _transaction(self._db):
                self._db.execute(
                    "INSERT INTO mqtt_sessions (client_id, device_id, subscriptions, updated_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (client_id) DO UPDATE SET "
                    "device_id = excluded.device_id, subscriptions = excluded.subscriptions, "
                    "updated_at = excluded.updated_at",
                    (client_id, device_id.bytes, body, now),
                )

        await self._call(write)

    async def delete_mqtt_session(self, scope: Scope, client_id: str) -> None:
        """Forget a session (a clean session starts)."""
        await self.delete_mqtt_sessions([(scope, client_id)])

    async def delete_mqtt_sessions(self, sessions: Sequence[tuple[Scope, str]]) -> None:
        """Forget several sessions, each (scope, client id), in one transaction."""
        if not sessions:
            return
        rows = []
        for scope, client_id in sessions:
            tenant = scope.bytes if scope else None
            rows.append((client_id, tenant, tenant))

        def delete() -> None:
            with _transaction(self._db):
                self._db.executemany(
                    f"DELETE FROM mqtt_sessions AS s WHERE client_id = ? AND EXISTS "
                    f"(SELECT 1 FROM devices d WHERE {_SCOPED})",
                    rows,
                )

        await self._call(delete)
