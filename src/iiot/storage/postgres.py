"""`PostgresStore`: the `Store` on PostgreSQL through an asyncpg connection pool.

A telemetry batch is COPYed straight into `telemetry`; only when it repeats stored points
does it go through a per-connection temporary staging table and `INSERT ... ON CONFLICT`.
Series seen for the first time get their `telemetry_latest` row in the same transaction;
the latest values themselves follow in a background refresh (`pg_latest`). Connection failures are
translated into `StorageUnavailable` here, at the edge; the pool replaces broken
connections by itself once the server answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Self, TypeVar
from uuid import UUID, uuid4

import asyncpg

from iiot.errors import Conflict, NotFound, StorageUnavailable
from iiot.model import Device
from iiot.storage import _common, pg_latest
from iiot.storage.base import DeviceFilter, Page, Scope
from iiot.storage.control_pg import PgControlStore
from iiot.storage.device_filters import device_where
from iiot.storage.postgres_devices import DEVICE_COLS, PostgresDevices, device_from_row
from iiot.storage.postgres_mqtt_sessions import PostgresMqttSessions
from iiot.storage.postgres_pool import (
    _RETRY_ONCE,
    _TRANSIENT,
    _UNAVAILABLE,
    SERVER_SETTINGS,
    _describe,
    _reset_connection,
)

# Helpers that moved with the telemetry code, still at hand for the methods here.
from iiot.storage.postgres_purge import queue_purges
from iiot.storage.postgres_reads import DEFAULT_QUERY_TIMEOUT_S, open_read_pool, query_too_long
from iiot.storage.postgres_telemetry import (  # noqa: F401
    _VALUE_COLS,
    PG_CURRENT_LATEST,
    PostgresTelemetry,
    _init_connection,
    _scalar,
    _value,
    lock_out_writers,
)
from iiot.storage.postgres_tenants import PostgresTenants
from iiot.storage.postgres_users import PostgresUsers

__all__ = ["PG_CURRENT_LATEST", "PostgresStore", "lock_out_writers"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# A fixed key for pg_advisory_xact_lock, so concurrent starts apply migrations one by one.
_MIGRATION_LOCK = 7_402_315_001

_DEVICE_COLS = DEVICE_COLS
_device = device_from_row


class PostgresStore(
    PostgresTelemetry, PostgresUsers, PostgresDevices, PostgresMqttSessions, PostgresTenants
):
    """The `Store` on PostgreSQL (asyncpg pool); reusable, not reentrant."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 5.0,
        read_url: str | None = None,
        query_timeout_s: float = DEFAULT_QUERY_TIMEOUT_S,
        ingest_connections: int = 4,
    ) -> None:
        """Remember the settings; nothing connects before `__aenter__`."""
        # asyncpg understands postgresql:// and postgres:// alike.
        self._url = url
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._pool: Any = None
        self._latest = pg_latest.LatestRefresher(self._run)
        # Devices known to exist, valid while the count of deletions stays the same.
        self._alive: set[UUID] = set()
        self._deletions_seen: int | None = None
        # Queries: a pool of their own (postgres_reads), on a replica when one is given.
        self._read_url = read_url or url
        self._query_timeout_s = query_timeout_s
        self._read_pool: Any = None
        # Telemetry commits: a pool of their own, so that they never wait for a connection
        # behind API and command statements (100 commands/s held the shared pool's queue
        # long enough to slow an ingest burst down; docs/performance.md).
        self._ingest_pool: Any = None
        self._ingest_connections = ingest_connections  # one per pipeline writer
        self.control = PgControlStore(self._run)  # commands and attributes

    # --- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        """Open the pool and bring the schema up to date."""
        if self._pool is not None:
            raise RuntimeError("PostgresStore is already open")
        self._pool = await self._open_pool(self._min_size, self._max_size)
        try:
            await self._run(self._migrate, retry=False)
            self._read_pool = await open_read_pool(
                self._read_url,
                max_size=self._max_size,
                timeout_s=self._query_timeout_s,
                connect_timeout=self._connect_timeout,
            )
            self._ingest_pool = await self._open_pool(1, self._ingest_connections)
            await self._start_background()
        except BaseException:
            await self._close()
            raise
        self._alive.clear()
        self._deletions_seen = None
        self._latest.start()
        return self

    async def _open_pool(self, min_size: int, max_size: int) -> Any:
        try:
            return await asyncpg.create_pool(
                self._url,
                min_size=min_size,
                max_size=max_size,
                timeout=self._connect_timeout,
                init=_init_connection,
                reset=_reset_connection,
                server_settings=SERVER_SETTINGS,
                # Idle connections are closed so that a failover leaves no stale ones.
                max_inactive_connection_lifetime=300.0,
            )
        except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
            raise StorageUnavailable(
                f"cannot connect to PostgreSQL at {_describe(self._url)}: {exc}"
            ) from exc

    async def __aexit__(self, *exc: object) -> None:
        """Close every connection of the pool."""
        await self._close()

    async def _close(self) -> None:
        await self._stop_background()
        if self._pool is not None:
            await self._latest.close()
        read_pool, self._read_pool = self._read_pool, None
        ingest_pool, self._ingest_pool = self._ingest_pool, None
        pool, self._pool = self._pool, None
        for closing in (read_pool, ingest_pool, pool):
            if closing is None:
                continue
            try:
                await asyncio.wait_for(closing.close(), timeout=10)
            except TimeoutError:
                closing.terminate()

    async def _migrate(self, conn: Any) -> None:
        async with conn.transaction():
            # Held until commit: a second process starting at once waits here, then sees
            # the versions the first one applied.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version integer PRIMARY KEY, name text NOT NULL, applied_at bigint NOT NULL)"
            )
            applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_version")}
            for migration in _common.load_migrations("postgres"):
                if migration.version in applied:
                    continue
                log.info("applying PostgreSQL migration %s", migration.name)
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_version (version, name, applied_at) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    _common.now_ms(),
                )

    async def _run(
        self,
        op: Callable[[Any], Awaitable[T]],
        *,
        retry: bool = True,
        read: bool = False,
        ingest: bool = False,
    ) -> T:
        """Run `op` on a pooled connection; connection failures become `StorageUnavailable`.

        With `retry`, an operation that failed on a connection that broke while idle is
        run once more on a fresh one; only idempotent operations may ask for this. With
        `read`, a read-only `op` runs on the queries' pool (postgres_reads); with `ingest`,
        on the telemetry commits' pool.
        """
        if self._pool is None:
            raise RuntimeError("PostgresStore is not open (use `async with`)")
        pool = self._pool
        if read and self._read_pool is not None:
            pool = self._read_pool
        elif ingest and self._ingest_pool is not None:
            pool = self._ingest_pool
        attempts = 2 if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                async with pool.acquire() as conn:
                    try:
                        return await op(conn)
                    except _UNAVAILABLE:
                        # Never hand a dead or confused connection to the next caller.
                        # Its idle siblings most likely died with it (server restart,
                        # failover): replace them all on their next use.
                        with contextlib.suppress(asyncpg.InterfaceError):
                            conn.terminate()  # unless the pool already took it back
                        await pool.expire_connections()
                        raise
            except asyncpg.QueryCanceledError as exc:
                if pool is self._read_pool:  # the statement timeout of queries
                    raise query_too_long(self._query_timeout_s) from exc
                raise
            except _TRANSIENT as exc:
                if attempt < attempts and isinstance(exc, _RETRY_ONCE):
                    log.debug("retrying after a broken connection: %s", exc)
                    continue
                raise StorageUnavailable(
                    f"PostgreSQL at {_describe(self._url)} is unavailable: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        raise AssertionError("unreachable")

    async def ping(self) -> None:
        """Raise `StorageUnavailable` when the database cannot answer now."""

        async def op(conn: Any) -> None:
            await conn.fetchval("SELECT 1")

        await self._run(op)

    # --- devices -----------------------------------------------------------------------
    async def create_device(
        self,
        tenant_id: UUID,
        name: str,
        token_hash: str,
        *,
        type: str = "default",
        gateway_id: UUID | None = None,
    ) -> Device:
        """Create an `active` device; `Conflict` if the name is taken in the tenant."""

        async def op(conn: Any) -> Device:
            try:
                row = await conn.fetchrow(
                    "INSERT INTO devices"
                    " (id, tenant_id, name, status, token_hash, created_at, type, gateway_id)"
                    " VALUES ($1, $2, $3, 'active', $4, $5, $6, $7)"
                    f" RETURNING {_DEVICE_COLS}",
                    uuid4(),
                    tenant_id,
                    name,
                    token_hash,
                    _common.now_ms(),
                    type,
                    gateway_id,
                )
            except asyncpg.UniqueViolationError as exc:
                raise _device_conflict(exc, name) from exc
            except asyncpg.ForeignKeyViolationError as exc:
                raise NotFound(f"tenant {tenant_id} not found") from exc
            return _device(row)

        return await self._run(op, retry=False)

    async def get_device(self, scope: Scope, device_id: UUID) -> Device:
        """One device visible in the scope."""

        async def op(conn: Any) -> Device:
            return await self._scoped_device(conn, scope, device_id)

        return await self._run(op)

    @staticmethod
    async def _scoped_device(conn: Any, scope: Scope, device_id: UUID) -> Device:
        row = await conn.fetchrow(
            f"SELECT {_DEVICE_COLS} FROM devices WHERE id = $1"
            " AND ($2::uuid IS NULL OR tenant_id = $2)",
            device_id,
            scope,
        )
        if row is None:
            raise NotFound(f"device {device_id} not found")
        return _device(row)

    async def find_device_by_token_hash(self, token_hash: str) -> Device | None:
        """The device whose token hashes to this value (not scoped: the token is the proof)."""

        async def op(conn: Any) -> Device | None:
            row = await conn.fetchrow(
                f"SELECT {_DEVICE_COLS} FROM devices WHERE token_hash = $1", token_hash
            )
            return None if row is None else _device(row)

        return await self._run(op)

    async def list_devices(
        self, scope: Scope, limit: int, offset: int, filters: DeviceFilter | None = None
    ) -> Page[Device]:
        """Devices visible in the scope (and matching the filter), by name."""
        _common.check_page(limit, offset)
        args: list[Any] = []

        def param(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        where = device_where(scope, filters, param, uuid=lambda u: u, like="ILIKE")
        page_args = [*args, limit, offset]
        n = len(args)

        async def op(conn: Any) -> Page[Device]:
            # The total comes with the page (one round trip); only a page past the end
            # needs its own count.
            rows = await conn.fetch(
                f"SELECT {_DEVICE_COLS}, count(*) OVER () AS total FROM devices {where}"
                f" ORDER BY name, id LIMIT ${n + 1} OFFSET ${n + 2}",
                *page_args,
            )
            if rows:
                return Page([_device(r) for r in rows], int(rows[0]["total"]))
            total = await conn.fetchval(f"SELECT count(*) FROM devices {where}", *args)
            return Page([], int(total))

        return await self._run(op, read=True)

    async def update_device(
        self,
        scope: Scope,
        device_id: UUID,
        *,
        name: str | None = None,
        status: str | None = None,
        type: str | None = None,
    ) -> Device:
        """Rename a device, change its status or its type."""

        async def op(conn: Any) -> Device:
            try:
                row = await conn.fetchrow(
                    "UPDATE devices SET name = coalesce($3, name), status = coalesce($4, status),"
                    " type = coalesce($5, type)"
                    " WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)"
                    f" RETURNING {_DEVICE_COLS}",
                    device_id,
                    scope,
                    name,
                    status,
                    type,
                )
            except asyncpg.UniqueViolationError as exc:
                raise _device_conflict(exc, name or "") from exc
            if row is None:
                raise NotFound(f"device {device_id} not found")
            return _device(row)

        return await self._run(op)

    async def set_device_token_hash(self, scope: Scope, device_id: UUID, token_hash: str) -> None:
        """Replace a device's token hash (rotation)."""

        async def op(conn: Any) -> None:
            try:
                status = await conn.execute(
                    "UPDATE devices SET token_hash = $3"
                    " WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)",
                    device_id,
                    scope,
                    token_hash,
                )
            except asyncpg.UniqueViolationError as exc:
                raise Conflict("this device token is already in use") from exc
            if status == "UPDATE 0":
                raise NotFound(f"device {device_id} not found")

        await self._run(op)

    async def delete_device(self, scope: Scope, device_id: UUID) -> None:
        """Delete a device and its telemetry."""

        async def op(conn: Any) -> None:
            async with conn.transaction():
                # Waits for batches in flight; later batches then find the device gone
                # and skip its points, so the telemetry purged next cannot gain new rows.
                await lock_out_writers(conn)
                status = await conn.execute(
                    "DELETE FROM devices WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)",
                    device_id,
                    scope,
                )
                if status == "DELETE 0":
                    raise NotFound(f"device {device_id} not found")
                # The points go after the commit, a batch at a time (postgres_purge).
                await queue_purges(conn, [device_id])

        await self._run(op, retry=False)
        await self._purge([device_id])


def _device_conflict(exc: Any, name: str) -> Conflict:
    if getattr(exc, "constraint_name", None) == "devices_token_hash_key":
        return Conflict("this device token is already in use")
    return Conflict(f"a device named {name!r} already exists in this tenant")
