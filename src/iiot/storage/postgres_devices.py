"""Device presence, certificates and lookups by name on PostgreSQL (a `PostgresStore` mixin)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar
from uuid import UUID

import asyncpg

from iiot.errors import Conflict, NotFound
from iiot.model import Device
from iiot.storage.base import Scope

__all__ = ["DEVICE_COLS", "PostgresDevices", "device_from_row"]

T = TypeVar("T")

DEVICE_COLS = "id, tenant_id, name, status, created_at, type, gateway_id, last_seen, connected"


def device_from_row(row: Any) -> Device:
    """A device from a row of `DEVICE_COLS`."""
    return Device(
        row["id"],
        row["tenant_id"],
        row["name"],
        row["status"],
        row["created_at"],
        row["type"],
        row["gateway_id"],
        row["last_seen"],
        row["connected"],
    )


class PostgresDevices:
    """Device methods beyond create/read/update/delete (the store provides `_run`)."""

    async def _run(self, op: Callable[[Any], Awaitable[T]], *, retry: bool = True) -> T:
        raise NotImplementedError

    async def find_device_by_name(self, tenant_id: UUID, name: str) -> Device | None:
        """The tenant's device of this name (a gateway's children are found by name)."""

        async def op(conn: Any) -> Device | None:
            row = await conn.fetchrow(
                f"SELECT {DEVICE_COLS} FROM devices WHERE tenant_id = $1 AND name = $2",
                tenant_id,
                name,
            )
            return None if row is None else device_from_row(row)

        return await self._run(op)

    async def find_device_by_certificate(self, fingerprint: str) -> Device | None:
        """The device whose registered client certificate has this SHA-256 fingerprint."""

        async def op(conn: Any) -> Device | None:
            row = await conn.fetchrow(
                f"SELECT {DEVICE_COLS} FROM devices WHERE cert_fingerprint = $1", fingerprint
            )
            return None if row is None else device_from_row(row)

        return await self._run(op)

    async def set_device_certificate(
        self, scope: Scope, device_id: UUID, fingerprint: str | None
    ) -> Device:
        """Register (or, with None, remove) a device's client certificate fingerprint."""

        async def op(conn: Any) -> Device:
            try:
                row = await conn.fetchrow(
                    "UPDATE devices SET cert_fingerprint = $3"
                    " WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)"
                    f" RETURNING {DEVICE_COLS}",
                    device_id,
                    scope,
                    fingerprint,
                )
            except asyncpg.UniqueViolationError as exc:
                raise Conflict("this certificate is already registered to a device") from exc
            if row is None:
                raise NotFound(f"device {device_id} not found")
            return device_from_row(row)

        return await self._run(op, retry=False)

    async def record_presence(
        self, last_seen: Mapping[UUID, int], connected: Mapping[UUID, bool]
    ) -> None:
        """Batched presence: last message times (never moved back) and connection states."""
        if not last_seen and not connected:
            return

        async def op(conn: Any) -> None:
            async with conn.transaction():
                if last_seen:
                    # Sorted ids: concurrent writers lock rows in one order, never deadlock.
                    ids = sorted(last_seen)
                    await conn.execute(
                        "UPDATE devices AS d SET last_seen = s.ts"
                        " FROM unnest($1::uuid[], $2::bigint[]) AS s (id, ts)"
                        " WHERE d.id = s.id AND (d.last_seen IS NULL OR d.last_seen < s.ts)",
                        ids,
                        [last_seen[i] for i in ids],
                    )
                if connected:
                    ids = sorted(connected)
                    await conn.execute(
                        "UPDATE devices AS d SET connected = s.state"
                        " FROM unnest($1::uuid[], $2::boolean[]) AS s (id, state)"
                        " WHERE d.id = s.id AND d.connected IS DISTINCT FROM s.state",
                        ids,
                        [connected[i] for i in ids],
                    )

        await self._run(op)
