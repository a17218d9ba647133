"""Tenants on PostgreSQL: a `PostgresStore` mixin (the store provides `_run` and `_purge`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from uuid import UUID, uuid4

import asyncpg

from iiot.errors import Conflict, InvalidRequest, NotFound
from iiot.model import Tenant
from iiot.storage import _common
from iiot.storage.base import Page, Scope
from iiot.storage.postgres_pool import scoped_page
from iiot.storage.postgres_purge import queue_purges
from iiot.storage.postgres_telemetry import lock_out_writers

__all__ = ["PostgresTenants"]

T = TypeVar("T")

_TENANT_COLS = "id, name, created_at, retention_days"


def _tenant(row: Any) -> Tenant:
    return Tenant(row["id"], row["name"], row["created_at"], row["retention_days"])


class PostgresTenants:
    """The tenant methods of `PostgresStore`."""

    async def _run(
        self, op: Callable[[Any], Awaitable[T]], *, retry: bool = True, read: bool = False
    ) -> T:
        raise NotImplementedError

    async def _purge(self, device_ids: Sequence[UUID]) -> None:
        raise NotImplementedError

    # --- tenants -----------------------------------------------------------------------
    async def create_tenant(self, name: str) -> Tenant:
        """Create a tenant; `Conflict` if the name is taken."""

        async def op(conn: Any) -> Tenant:
            try:
                row = await conn.fetchrow(
                    f"INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)"
                    f" RETURNING {_TENANT_COLS}",
                    uuid4(),
                    name,
                    _common.now_ms(),
                )
            except asyncpg.UniqueViolationError as exc:
                raise Conflict(f"a tenant named {name!r} already exists") from exc
            return _tenant(row)

        return await self._run(op, retry=False)

    async def get_tenant(self, scope: Scope, tenant_id: UUID) -> Tenant:
        """One tenant visible in the scope."""
        if scope is not None and scope != tenant_id:
            raise NotFound(f"tenant {tenant_id} not found")

        async def op(conn: Any) -> Tenant:
            row = await conn.fetchrow(
                f"SELECT {_TENANT_COLS} FROM tenants WHERE id = $1", tenant_id
            )
            if row is None:
                raise NotFound(f"tenant {tenant_id} not found")
            return _tenant(row)

        return await self._run(op)

    async def list_tenants(self, scope: Scope, limit: int, offset: int) -> Page[Tenant]:
        """Tenants visible in the scope, by name."""
        _common.check_page(limit, offset)

        async def op(conn: Any) -> Page[Tenant]:
            rows, total = await scoped_page(
                conn, "tenants", _TENANT_COLS, "id", "name", scope, (limit, offset)
            )
            return Page([_tenant(r) for r in rows], total)

        return await self._run(op, read=True)

    async def update_tenant(
        self,
        scope: Scope,
        tenant_id: UUID,
        *,
        name: str | None = None,
        retention_days: int | None = None,
        clear_retention: bool = False,
    ) -> Tenant:
        """Rename a tenant or change its telemetry retention."""
        if scope is not None and scope != tenant_id:
            raise NotFound(f"tenant {tenant_id} not found")
        if retention_days is not None and retention_days <= 0:
            raise InvalidRequest(f"retention_days must be > 0 (got {retention_days})")

        async def op(conn: Any) -> Tenant:
            try:
                row = await conn.fetchrow(
                    f"UPDATE tenants SET name = coalesce($2, name),"
                    f" retention_days = CASE WHEN $4 THEN NULL"
                    f" ELSE coalesce($3, retention_days) END"
                    f" WHERE id = $1 RETURNING {_TENANT_COLS}",
                    tenant_id,
                    name,
                    retention_days,
                    clear_retention,
                )
            except asyncpg.UniqueViolationError as exc:
                raise Conflict(f"a tenant named {name!r} already exists") from exc
            if row is None:
                raise NotFound(f"tenant {tenant_id} not found")
            return _tenant(row)

        return await self._run(op)

    async def delete_tenant(self, scope: Scope, tenant_id: UUID) -> None:
        """Delete a tenant with its users, devices and telemetry."""
        if scope is not None and scope != tenant_id:
            raise NotFound(f"tenant {tenant_id} not found")

        async def op(conn: Any) -> list[UUID]:
            async with conn.transaction():
                # As in delete_device: in-flight batches finish first, and none can add
                # rows to a device being deleted.
                await lock_out_writers(conn)
                ids = [
                    r["id"]
                    for r in await conn.fetch(
                        "SELECT id FROM devices WHERE tenant_id = $1", tenant_id
                    )
                ]
                status = await conn.execute("DELETE FROM tenants WHERE id = $1", tenant_id)
                if status == "DELETE 0":
                    raise NotFound(f"tenant {tenant_id} not found")
                # The points go after the commit, a batch at a time (postgres_purge).
                await queue_purges(conn, ids)
                return ids

        await self._purge(await self._run(op))
