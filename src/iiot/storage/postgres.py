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
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit
from uuid import UUID, uuid4

import asyncpg

from iiot.errors import Conflict, InvalidPayload, InvalidRequest, NotFound, StorageUnavailable
from iiot.model import Device, DevicePoints, Point, Role, Scalar, Tenant, User
from iiot.storage import _common, pg_latest
from iiot.storage.base import Page, Scope, TelemetryQuery

__all__ = ["PG_CURRENT_LATEST", "PostgresStore", "lock_out_writers"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that mean "the server cannot be reached or the connection broke": the operation
# did not complete and may be retried later.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # asyncpg raises this for a pooled connection whose backend was terminated while idle
    # (MagicStack/asyncpg#784, #1069): a dead connection like any other.
    asyncpg.exceptions.InternalClientError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, crash shutdown
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    OSError,
    TimeoutError,
)
# A pooled connection that died while idle (server restart, pg_terminate_backend) or a
# transaction that lost a deadlock: retrying an idempotent operation once at once hides it.
_RETRY_ONCE: tuple[type[BaseException], ...] = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)
# Transient conflicts between transactions: after the retry they count as "unavailable".
_TRANSIENT = (*_UNAVAILABLE, *_RETRY_ONCE)

# A fixed key for pg_advisory_xact_lock, so concurrent starts apply migrations one by one.
_MIGRATION_LOCK = 7_402_315_001

_VALUE_COLS = "num_value, int_value, bool_value, str_value"
_STAGE_DDL = """
CREATE TEMPORARY TABLE IF NOT EXISTS telemetry_stage (
    device_id uuid NOT NULL, key text NOT NULL, ts bigint NOT NULL,
    num_value double precision, int_value bigint, bool_value boolean, str_value text
) ON COMMIT DELETE ROWS
"""
_STAGE_COLUMNS = ("device_id", "key", "ts", "num_value", "int_value", "bool_value", "str_value")
# Sorted by the primary key: every writer takes row locks in the same order (no deadlock
# between overlapping batches) and the b-tree is filled left to right.
_MERGE_TELEMETRY = f"""
INSERT INTO telemetry AS t (device_id, key, ts, {_VALUE_COLS})
SELECT device_id, key, ts, {_VALUE_COLS} FROM telemetry_stage ORDER BY device_id, key, ts
ON CONFLICT (device_id, key, ts) DO UPDATE
SET num_value = EXCLUDED.num_value, int_value = EXCLUDED.int_value,
    bool_value = EXCLUDED.bool_value, str_value = EXCLUDED.str_value
WHERE (t.num_value, t.int_value, t.bool_value, t.str_value)
      IS DISTINCT FROM (EXCLUDED.num_value, EXCLUDED.int_value, EXCLUDED.bool_value,
                        EXCLUDED.str_value)
"""
# Taken shared by every telemetry batch and exclusively by whatever deletes devices.
_DEVICES_LOCK = 0x1107_DE71
# The lock, then the count of device deletions so far (migration 0003). In this order in
# one statement (CASE evaluates its condition first): a deletion bumps the count while it
# holds the lock exclusively, so a count read under the shared lock is current until the
# transaction ends.
_LOCK_AND_DELETIONS = (
    "SELECT CASE WHEN pg_advisory_xact_lock_shared($1) IS NULL THEN NULL"
    " ELSE coalesce(pg_sequence_last_value('device_deletions'), 0) END"
)

_AGG_SQL = {
    "avg": "avg(num)",
    "min": "min(num)",
    "max": "max(num)",
    "sum": "sum(num)",
    "count": "count(*)",
}
# The latest values of a device: no row means the device is not visible, one row of NULLs
# a device without data. telemetry_latest may lag behind the stored points by one refresh
# (pg_latest), so each key's row is checked against the newest point at or after it: one
# index probe, which finds the row's own point when the row is current.
_LATEST_SQL = f"""
SELECT l.key, l.ts, l.num_value, l.int_value, l.bool_value, l.str_value,
       n.ts, n.num_value, n.int_value, n.bool_value, n.str_value
FROM devices d
LEFT JOIN telemetry_latest l ON l.device_id = d.id AND ($3::text[] IS NULL OR l.key = ANY($3))
LEFT JOIN LATERAL (
    SELECT t.ts, {_VALUE_COLS} FROM telemetry t
    WHERE t.device_id = l.device_id AND t.key = l.key AND t.ts >= l.ts
    ORDER BY t.ts DESC LIMIT 1
) AS n ON true
WHERE d.id = $1 AND ($2::uuid IS NULL OR d.tenant_id = $2)
ORDER BY l.key
"""
# Every row of telemetry_latest as readers see it (the same check as _LATEST_SQL), for
# backups.
PG_CURRENT_LATEST = f"""
SELECT l.device_id, l.key, coalesce(n.ts, l.ts),
       CASE WHEN n.ts IS NULL THEN l.num_value ELSE n.num_value END,
       CASE WHEN n.ts IS NULL THEN l.int_value ELSE n.int_value END,
       CASE WHEN n.ts IS NULL THEN l.bool_value ELSE n.bool_value END,
       CASE WHEN n.ts IS NULL THEN l.str_value ELSE n.str_value END
FROM telemetry_latest l
LEFT JOIN LATERAL (
    SELECT t.ts, {_VALUE_COLS} FROM telemetry t
    WHERE t.device_id = l.device_id AND t.key = l.key AND t.ts >= l.ts
    ORDER BY t.ts DESC LIMIT 1
) AS n ON true
"""
_TENANT_COLS = "id, name, created_at, retention_days"
_USER_COLS = "id, username, role, tenant_id, password_hash, created_at, token_version"
_DEVICE_COLS = "id, tenant_id, name, status, created_at"
# Telemetry reads. $1 device, $2 scope, $3 keys (NULL: every key the device has, which all
# have a row in telemetry_latest), $4 start, $5 end, $6 limit per key. The device's scope
# is checked in the same statement: no row at all means the device is not visible.
# Each key is one range scan of the (device_id, key, ts) primary key.
_QUERY_KEYS = (
    "coalesce($3::text[], ARRAY(SELECT key FROM telemetry_latest WHERE device_id = $1"
    " ORDER BY key))"
)
# The lateral part reads only what the telemetry key holds (migration 0002), so a range is
# an index-only scan; str_value, outside the key, is fetched per point for string points only.
_RAW_SQL = (
    "SELECT k.key, t.ts, t.num_value, t.int_value, t.bool_value,"
    " CASE WHEN t.ts IS NOT NULL AND num_nonnulls(t.num_value, t.int_value, t.bool_value) = 0"
    "  THEN (SELECT s.str_value FROM telemetry s"
    "        WHERE s.device_id = $1 AND s.key = k.key AND s.ts = t.ts) END"
    " FROM devices d"
    f" LEFT JOIN LATERAL unnest({_QUERY_KEYS}) WITH ORDINALITY AS k(key, n) ON true"
    " LEFT JOIN LATERAL (SELECT ts, num_value, int_value, bool_value"
    "  FROM telemetry WHERE device_id = $1 AND key = k.key AND ts >= $4 AND ts < $5"
    "  ORDER BY ts {direction} LIMIT $6) AS t ON true"
    " WHERE d.id = $1 AND ($2::uuid IS NULL OR d.tenant_id = $2)"
    " ORDER BY k.n, t.ts {direction}"
)
# $7: the interval. Buckets are floor(ts / interval) * interval, also for negative ts.
_AGG_QUERY = f"""
WITH p AS (
    SELECT key, ts - ((ts % $7) + $7) % $7 AS bucket,
           coalesce(num_value, int_value::double precision) AS num
    FROM telemetry
    WHERE device_id = $1 AND key = ANY({_QUERY_KEYS}) AND ts >= $4 AND ts < $5
), g AS (
    SELECT key, bucket, {{agg}} AS value FROM p GROUP BY key, bucket
), r AS (
    SELECT key, bucket, value,
           row_number() OVER (PARTITION BY key ORDER BY bucket {{direction}}) AS n
    FROM g WHERE value IS NOT NULL
)
SELECT r.key, r.bucket, r.value
FROM devices d LEFT JOIN r ON r.n <= $6
WHERE d.id = $1 AND ($2::uuid IS NULL OR d.tenant_id = $2)
ORDER BY r.key, r.bucket {{direction}}
"""
# The same when the limit cannot cut anything (it is at least the number of buckets in the
# range, as for a dashboard chart): no numbering of the buckets. $6: the interval.
_AGG_ALL_QUERY = f"""
WITH p AS (
    SELECT key, ts - ((ts % $6) + $6) % $6 AS bucket,
           coalesce(num_value, int_value::double precision) AS num
    FROM telemetry
    WHERE device_id = $1 AND key = ANY({_QUERY_KEYS}) AND ts >= $4 AND ts < $5
), g AS (
    SELECT key, bucket, {{agg}} AS value FROM p GROUP BY key, bucket
)
SELECT g.key, g.bucket, g.value
FROM devices d LEFT JOIN g ON g.value IS NOT NULL
WHERE d.id = $1 AND ($2::uuid IS NULL OR d.tenant_id = $2)
ORDER BY g.key, g.bucket {{direction}}
"""


async def _init_connection(conn: Any) -> None:
    """Give each new pooled connection its own staging table (temporary: no WAL, no bloat)."""
    await conn.execute(_STAGE_DDL)


async def _reset_connection(conn: Any) -> None:
    """Make a connection fit for the next caller when it goes back to the pool.

    asyncpg's default reset runs `pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL` on every release: one more round trip per call, for session features this store
    never uses (its advisory lock is transaction-scoped). Only an open transaction, which
    an interrupted call may leave behind, needs undoing.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def lock_out_writers(conn: Any) -> None:
    """In a transaction about to delete devices: wait for batches in flight, hold off
    later ones until commit, and make every writer check its devices again."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _DEVICES_LOCK)
    await conn.execute("SELECT nextval('device_deletions')")


def _describe(url: str) -> str:
    """host:port/db of a URL, without the password, for messages."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"


def _tenant(row: Any) -> Tenant:
    return Tenant(row["id"], row["name"], row["created_at"], row["retention_days"])


def _user(row: Any) -> User:
    return User(
        id=row["id"],
        username=row["username"],
        role=Role(row["role"]),
        tenant_id=row["tenant_id"],
        password_hash=row["password_hash"],
        created_at=row["created_at"],
        token_version=row["token_version"],
    )


def _device(row: Any) -> Device:
    return Device(row["id"], row["tenant_id"], row["name"], row["status"], row["created_at"])


def _value(row: Any) -> Scalar:
    return _common.value_from_columns(
        row["num_value"], row["int_value"], row["bool_value"], row["str_value"]
    )


def _scalar(num: Any, integer: Any, boolean: Any, text: Any) -> Scalar:
    # `_common.value_from_columns` inlined for the hot read paths (thousands of rows).
    if num is not None:
        return float(num)
    if integer is not None:
        return int(integer)
    if boolean is not None:
        return bool(boolean)
    if text is not None:
        return str(text)
    raise ValueError("telemetry row without a value")


def _raw_result(rows: Sequence[Any]) -> dict[str, list[tuple[int, Scalar]]]:
    """Rows of `_RAW_SQL` (key, ts, value columns), ordered, as (ts, value) lists per key."""
    result: dict[str, list[tuple[int, Scalar]]] = {}
    current: str | None = None
    points: list[tuple[int, Scalar]] = []
    for key, ts, num, integer, boolean, text in rows:
        if ts is None:  # a key without data in the range
            continue
        if key != current:
            current = key
            points = result.setdefault(key, [])
        if num is not None:
            points.append((ts, num))  # asyncpg decodes float8 to float already
        else:
            points.append((ts, _scalar(num, integer, boolean, text)))
    return result


class PostgresStore:
    """The `Store` on PostgreSQL (asyncpg pool); reusable, not reentrant."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 5.0,
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

    # --- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        """Open the pool and bring the schema up to date."""
        if self._pool is not None:
            raise RuntimeError("PostgresStore is already open")
        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=self._min_size,
                max_size=self._max_size,
                timeout=self._connect_timeout,
                init=_init_connection,
                reset=_reset_connection,
                # Idle connections are closed so that a failover leaves no stale ones.
                max_inactive_connection_lifetime=300.0,
            )
        except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
            raise StorageUnavailable(
                f"cannot connect to PostgreSQL at {_describe(self._url)}: {exc}"
            ) from exc
        try:
            await self._run(self._migrate, retry=False)
        except BaseException:
            await self._close()
            raise
        self._alive.clear()
        self._deletions_seen = None
        self._latest.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close every connection of the pool."""
        await self._close()

    async def _close(self) -> None:
        if self._pool is not None:
            await self._latest.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=10)
            except TimeoutError:
                pool.terminate()

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

    async def _run(self, op: Callable[[Any], Awaitable[T]], *, retry: bool = True) -> T:
        """Run `op` on a pooled connection; connection failures become `StorageUnavailable`.

        With `retry`, an operation that failed on a connection that broke while idle is
        run once more on a fresh one; only idempotent operations may ask for this.
        """
        if self._pool is None:
            raise RuntimeError("PostgresStore is not open (use `async with`)")
        attempts = 2 if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                async with self._pool.acquire() as conn:
                    try:
                        return await op(conn)
                    except _UNAVAILABLE:
                        # Never hand a dead or confused connection to the next caller.
                        # Its idle siblings most likely died with it (server restart,
                        # failover): replace them all on their next use.
                        with contextlib.suppress(asyncpg.InterfaceError):
                            conn.terminate()  # unless the pool already took it back
                        await self._pool.expire_connections()
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
            where = "WHERE ($1::uuid IS NULL OR id = $1)"
            total = await conn.fetchval(f"SELECT count(*) FROM tenants {where}", scope)
            rows = await conn.fetch(
                f"SELECT {_TENANT_COLS} FROM tenants {where} ORDER BY name LIMIT $2 OFFSET $3",
                scope,
                limit,
                offset,
            )
            return Page([_tenant(r) for r in rows], int(total))

        return await self._run(op)

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

        async def op(conn: Any) -> None:
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
                await conn.execute("DELETE FROM telemetry WHERE device_id = ANY($1::uuid[])", ids)

        await self._run(op)

    # --- users -------------------------------------------------------------------------
    async def create_user(
        self, tenant_id: UUID | None, username: str, password_hash: str, role: Role
    ) -> User:
        """Create a user; usernames are unique across the platform (`Conflict`)."""
        role = Role(role)
        _common.check_user_tenant(role, tenant_id)

        async def op(conn: Any) -> User:
            try:
                row = await conn.fetchrow(
                    "INSERT INTO users (id, username, password_hash, role, tenant_id, created_at)"
                    f" VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_USER_COLS}",
                    uuid4(),
                    username,
                    password_hash,
                    role.value,
                    tenant_id,
                    _common.now_ms(),
                )
            except asyncpg.UniqueViolationError as exc:
                raise Conflict(f"a user named {username!r} already exists") from exc
            except asyncpg.ForeignKeyViolationError as exc:
                raise NotFound(f"tenant {tenant_id} not found") from exc
            return _user(row)

        return await self._run(op, retry=False)

    async def get_user(self, scope: Scope, user_id: UUID) -> User:
        """One user visible in the scope."""

        async def op(conn: Any) -> User:
            row = await conn.fetchrow(
                f"SELECT {_USER_COLS} FROM users WHERE id = $1"
                " AND ($2::uuid IS NULL OR tenant_id = $2)",
                user_id,
                scope,
            )
            if row is None:
                raise NotFound(f"user {user_id} not found")
            return _user(row)

        return await self._run(op)

    async def find_user(self, username: str) -> User | None:
        """The user with this username, for login (not scoped)."""

        async def op(conn: Any) -> User | None:
            row = await conn.fetchrow(
                f"SELECT {_USER_COLS} FROM users WHERE username = $1", username
            )
            return None if row is None else _user(row)

        return await self._run(op)

    async def count_users(self) -> int:
        """How many users exist (to create the first administrator)."""

        async def op(conn: Any) -> int:
            return int(await conn.fetchval("SELECT count(*) FROM users"))

        return await self._run(op)

    async def list_users(self, scope: Scope, limit: int, offset: int) -> Page[User]:
        """Users visible in the scope, by username."""
        _common.check_page(limit, offset)

        async def op(conn: Any) -> Page[User]:
            where = "WHERE ($1::uuid IS NULL OR tenant_id = $1)"
            total = await conn.fetchval(f"SELECT count(*) FROM users {where}", scope)
            rows = await conn.fetch(
                f"SELECT {_USER_COLS} FROM users {where} ORDER BY username LIMIT $2 OFFSET $3",
                scope,
                limit,
                offset,
            )
            return Page([_user(r) for r in rows], int(total))

        return await self._run(op)

    async def update_user(
        self,
        scope: Scope,
        user_id: UUID,
        *,
        password_hash: str | None = None,
        role: Role | None = None,
    ) -> User:
        """Change a user's password hash or role."""

        async def op(conn: Any) -> User:
            async with conn.transaction():
                row = await conn.fetchrow(
                    f"SELECT {_USER_COLS} FROM users WHERE id = $1"
                    " AND ($2::uuid IS NULL OR tenant_id = $2) FOR UPDATE",
                    user_id,
                    scope,
                )
                if row is None:
                    raise NotFound(f"user {user_id} not found")
                if role is not None:
                    _common.check_user_tenant(Role(role), row["tenant_id"])
                row = await conn.fetchrow(
                    "UPDATE users SET password_hash = coalesce($2, password_hash),"
                    " role = coalesce($3, role), token_version = token_version"
                    " + CASE WHEN $2::text IS NULL AND $3::text IS NULL THEN 0 ELSE 1 END"
                    f" WHERE id = $1 RETURNING {_USER_COLS}",
                    user_id,
                    password_hash,
                    None if role is None else Role(role).value,
                )
                return _user(row)

        return await self._run(op)

    async def delete_user(self, scope: Scope, user_id: UUID) -> None:
        """Delete a user."""

        async def op(conn: Any) -> None:
            status = await conn.execute(
                "DELETE FROM users WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)",
                user_id,
                scope,
            )
            if status == "DELETE 0":
                raise NotFound(f"user {user_id} not found")

        await self._run(op, retry=False)

    # --- devices -----------------------------------------------------------------------
    async def create_device(self, tenant_id: UUID, name: str, token_hash: str) -> Device:
        """Create an `active` device; `Conflict` if the name is taken in the tenant."""

        async def op(conn: Any) -> Device:
            try:
                row = await conn.fetchrow(
                    "INSERT INTO devices (id, tenant_id, name, status, token_hash, created_at)"
                    f" VALUES ($1, $2, $3, 'active', $4, $5) RETURNING {_DEVICE_COLS}",
                    uuid4(),
                    tenant_id,
                    name,
                    token_hash,
                    _common.now_ms(),
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

    async def list_devices(self, scope: Scope, limit: int, offset: int) -> Page[Device]:
        """Devices visible in the scope, by name."""
        _common.check_page(limit, offset)

        async def op(conn: Any) -> Page[Device]:
            where = "WHERE ($1::uuid IS NULL OR tenant_id = $1)"
            # The total comes with the page (one round trip); only a page past the end
            # needs its own count.
            rows = await conn.fetch(
                f"SELECT {_DEVICE_COLS}, count(*) OVER () AS total FROM devices {where}"
                " ORDER BY name, id LIMIT $2 OFFSET $3",
                scope,
                limit,
                offset,
            )
            if rows:
                return Page([_device(r) for r in rows], int(rows[0]["total"]))
            total = await conn.fetchval(f"SELECT count(*) FROM devices {where}", scope)
            return Page([], int(total))

        return await self._run(op)

    async def update_device(
        self,
        scope: Scope,
        device_id: UUID,
        *,
        name: str | None = None,
        status: str | None = None,
    ) -> Device:
        """Rename a device or change its status."""

        async def op(conn: Any) -> Device:
            try:
                row = await conn.fetchrow(
                    "UPDATE devices SET name = coalesce($3, name), status = coalesce($4, status)"
                    " WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)"
                    f" RETURNING {_DEVICE_COLS}",
                    device_id,
                    scope,
                    name,
                    status,
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
                # and skip its points, so the telemetry deleted next cannot gain new rows.
                await lock_out_writers(conn)
                status = await conn.execute(
                    "DELETE FROM devices WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)",
                    device_id,
                    scope,
                )
                if status == "DELETE 0":
                    raise NotFound(f"device {device_id} not found")
                await conn.execute("DELETE FROM telemetry WHERE device_id = $1", device_id)

        await self._run(op, retry=False)

    # --- telemetry ---------------------------------------------------------------------
    async def write_points(self, batch: Sequence[DevicePoints]) -> None:
        """Store points in one transaction; latest values follow (see `pg_latest`).

        Idempotent: a (device, key, ts) already stored keeps one row (the newer value wins).
        Points of devices deleted meanwhile are skipped (logged), so that the rest of the
        batch commits and a pipeline never retries a batch forever. Raises
        `StorageUnavailable` when the database cannot be reached; then nothing of the batch
        is committed and the caller may retry it whole.
        """
        # `newest` holds only series without a latest-value row yet (see pg_latest).
        rows = _common.batch_rows(batch, self._latest.known)
        if not rows.rows:
            return

        async def op(conn: Any) -> _common.BatchRows:
            # Almost every batch holds only new points, and a COPY straight into the table
            # is the fastest way in. A batch that repeats stored points (a retry, a device
            # resending) makes that COPY fail on the primary key; the transaction is then
            # run again the general way: COPY into the staging table, INSERT ... ON
            # CONFLICT. (A savepoint instead would stamp every row with a subtransaction.)
            try:
                return await self._write_transaction(conn, rows, merge=False)
            except (asyncpg.UniqueViolationError, asyncpg.exceptions.DeadlockDetectedError):
                return await self._write_transaction(conn, rows, merge=True)

        # Idempotent by design, so a broken idle connection is retried at once.
        try:
            written = await self._run(op)
        except asyncpg.DataError as exc:
            # A value PostgreSQL cannot hold: refused for good (the pipeline then finds
            # the message that carries it and refuses only that one).
            raise InvalidPayload(f"the database refused a value: {exc}") from None
        self._latest.committed(written.device_ids, written.newest)

    async def _write_transaction(
        self, conn: Any, rows: _common.BatchRows, *, merge: bool
    ) -> _common.BatchRows:
        """One transaction storing the rows of live devices and the rows of new series.

        Returns what was written (`newest`: the new series, inserted into telemetry_latest).
        """
        async with conn.transaction():
            # No foreign key per row: batches share one advisory lock that device deletes
            # take exclusively, so a delete waits for batches in flight and later batches
            # find the device gone. Devices seen alive since the last deletion anywhere
            # need no check (a deletion bumps the count read here).
            deletions = await conn.fetchval(_LOCK_AND_DELETIONS, _DEVICES_LOCK)
            if deletions != self._deletions_seen:
                self._alive.clear()
                self._latest.forget_series()
                self._deletions_seen = deletions
                # Rows of series thought known may be gone too (a forced restore): this
                # batch registers all of its series again.
                rows = rows.with_every_series()
            alive = self._alive
            unchecked = [d for d in rows.device_ids if d not in alive]
            if unchecked:
                found = await conn.fetch(
                    "SELECT id FROM devices WHERE id = ANY($1::uuid[])", unchecked
                )
                alive.update(r["id"] for r in found)
                if len(found) != len(unchecked):
                    kept = rows.without(alive)
                    log.warning(
                        "skipped %d points of %d deleted device(s)",
                        len(rows.rows) - len(kept.rows),
                        len(unchecked) - len(found),
                    )
                    rows = kept
                    if not rows.rows:
                        return rows
            if merge:
                await conn.copy_records_to_table(
                    "telemetry_stage",
                    records=_common.dedup_rows(rows.rows),
                    columns=_STAGE_COLUMNS,
                )
                await conn.execute(_MERGE_TELEMETRY)
            else:
                await conn.copy_records_to_table(
                    "telemetry", records=rows.rows, columns=_STAGE_COLUMNS
                )
            if rows.newest:
                await conn.execute(pg_latest.MERGE_LATEST, *pg_latest.as_columns(rows.newest))
            return rows

    async def query_telemetry(
        self, scope: Scope, device_id: UUID, query: TelemetryQuery
    ) -> dict[str, list[tuple[int, Scalar]]]:
        """Raw points or aggregates per key, as (ts, value) pairs in the query's order.

        Only keys with data in [start, end) appear. Aggregates are computed per bucket
        `floor(ts / interval) * interval`; avg/min/max/sum use numbers only (booleans and
        strings are skipped, and a bucket without numbers is left out); count counts every
        point. Numeric aggregates are floats, counts ints.
        """
        _common.check_query(query)
        direction = "DESC" if query.order == "desc" else "ASC"
        keys = None if query.keys is None else list(dict.fromkeys(query.keys))

        async def op(conn: Any) -> dict[str, list[tuple[int, Scalar]]]:
            if keys == [] or query.end <= query.start or query.limit == 0:
                await self._scoped_device(conn, scope, device_id)
                return {}
            # One statement checks the device's scope and reads the data (one round trip).
            # It answers no row when the device is not visible, and a row of NULLs per key
            # (raw) or one (aggregates) when there is no data.
            if query.agg == "none":
                rows = await conn.fetch(_RAW_SQL.format(direction=direction), *params)
                if not rows:
                    raise NotFound(f"device {device_id} not found")
                return _raw_result(rows)
            first = query.start - query.start % query.interval_ms
            args: tuple[Any, ...]
            if query.limit >= (query.end - 1 - first) // query.interval_ms + 1:
                sql, args = _AGG_ALL_QUERY, (*params[:5], query.interval_ms)
            else:
                sql, args = _AGG_QUERY, (*params, query.interval_ms)
            sql = sql.format(agg=_AGG_SQL[query.agg], direction=direction)
            rows = await conn.fetch(sql, *args)
            if not rows:
                raise NotFound(f"device {device_id} not found")
            result: dict[str, list[tuple[int, Scalar]]] = {}
            cast: Callable[[Any], Scalar] = int if query.agg == "count" else float
            for key, bucket, value in rows:
                if key is not None:
                    result.setdefault(key, []).append((bucket, cast(value)))
            return result

        params = (device_id, scope, keys, query.start, query.end, query.limit)
        return await self._run(op)

    async def latest(
        self, scope: Scope, device_id: UUID, keys: Sequence[str] | None = None
    ) -> dict[str, Point]:
        """The newest point (largest ts) of each key of a device."""

        async def op(conn: Any) -> dict[str, Point]:
            # The scope check and the read in one statement: no row means no visible device,
            # one row of NULLs a device without data.
            rows = await conn.fetch(_LATEST_SQL, device_id, scope, keys_filter)
            if not rows:
                raise NotFound(f"device {device_id} not found")
            latest: dict[str, Point] = {}
            for key, ts, num, integer, boolean, text, *stored in rows:
                if key is None:
                    continue
                if stored[0] is not None:  # a stored point at or after the row's ts wins
                    ts, num, integer, boolean, text = stored
                latest[key] = Point(key, ts, _scalar(num, integer, boolean, text))
            return latest

        keys_filter = None if keys is None else list(keys)
        return await self._run(op)

    async def delete_telemetry_before(self, tenant_id: UUID, before_ts: int) -> int:
        """Delete a tenant's raw telemetry older than `before_ts`; returns rows removed.

        Works in small batches, each its own short transaction, one (device, key) range of
        the primary key at a time: ingestion and readers never wait long behind it, and a
        crash midway leaves only committed batches (running it again finishes the job).
        """
        batch = 5000  # rows per transaction: a few tens of ms of row locks at most

        async def series(conn: Any) -> list[tuple[UUID, str]]:
            # Every key ever written has a latest row (kept by retention): the index ranges.
            rows = await conn.fetch(
                "SELECT l.device_id, l.key FROM telemetry_latest l"
                " JOIN devices d ON d.id = l.device_id WHERE d.tenant_id = $1"
                " ORDER BY l.device_id, l.key",
                tenant_id,
            )
            return [(r["device_id"], r["key"]) for r in rows]

        removed = 0
        for device_id, key in await self._run(series):
            while True:

                async def chunk(conn: Any, device_id: UUID = device_id, key: str = key) -> int:
                    # The batch ends at the batch-th oldest expired point (ts is unique
                    # within a series), so each DELETE is one bounded index range.
                    status = await conn.execute(
                        "DELETE FROM telemetry WHERE device_id = $1 AND key = $2 AND ts <"
                        " coalesce((SELECT ts + 1 FROM telemetry WHERE device_id = $1"
                        "  AND key = $2 AND ts < $3 ORDER BY ts OFFSET $4 - 1 LIMIT 1), $3)",
                        device_id,
                        key,
                        before_ts,
                        batch,
                    )
                    return int(status.rsplit(" ", 1)[1])

                deleted = await self._run(chunk)
                removed += deleted
                if deleted < batch:
                    break
        return removed


def _device_conflict(exc: Any, name: str) -> Conflict:
    if getattr(exc, "constraint_name", None) == "devices_token_hash_key":
        return Conflict("this device token is already in use")
    return Conflict(f"a device named {name!r} already exists in this tenant")
