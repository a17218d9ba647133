"""`SqliteStore`: the embedded, zero-setup `Store` on the standard library's sqlite3.

One dedicated worker thread owns the only connection. Each store method runs there as
one synchronous function, start to end, so a transaction never interleaves with another
coroutine's statements and no lock is needed in Python. The database runs in WAL mode with
`synchronous=FULL`: readers in other processes (backups) never block the writer, and every
commit is on disk before a device is acknowledged, even across a power cut (the pipeline's
batching keeps the number of fsyncs low).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self, TypeVar
from uuid import UUID, uuid4

from iiot.errors import Conflict, InvalidRequest, NotFound, StorageUnavailable
from iiot.model import Device, DevicePoints, Point, Role, Scalar, Tenant, User
from iiot.storage import _common
from iiot.storage.base import Page, Scope, TelemetryQuery

__all__ = ["SqliteStore"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Primary result codes meaning "the database cannot serve us now" (locked by another
# process beyond the busy timeout, disk full or failing, file gone): retry later.
_UNAVAILABLE_CODES = {
    5,  # SQLITE_BUSY
    6,  # SQLITE_LOCKED
    7,  # SQLITE_NOMEM
    8,  # SQLITE_READONLY
    10,  # SQLITE_IOERR
    13,  # SQLITE_FULL
    14,  # SQLITE_CANTOPEN
    15,  # SQLITE_PROTOCOL
}
# SQLite allows 32766 host parameters per statement; stay far below it.
_CHUNK = 500

_VALUE_COLS = "num_value, int_value, bool_value, str_value"
_UPSERT_TELEMETRY = f"""
INSERT INTO telemetry (device_id, key, ts, {_VALUE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (device_id, key, ts) DO UPDATE
SET num_value = excluded.num_value, int_value = excluded.int_value,
    bool_value = excluded.bool_value, str_value = excluded.str_value
WHERE (num_value, int_value, bool_value, str_value)
      IS NOT (excluded.num_value, excluded.int_value, excluded.bool_value, excluded.str_value)
"""
# A late (older) point never replaces a newer latest value; the same ts replaces it.
_UPSERT_LATEST = f"""
INSERT INTO telemetry_latest (device_id, key, ts, {_VALUE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (device_id, key) DO UPDATE
SET ts = excluded.ts, num_value = excluded.num_value, int_value = excluded.int_value,
    bool_value = excluded.bool_value, str_value = excluded.str_value
WHERE excluded.ts > telemetry_latest.ts OR (excluded.ts = telemetry_latest.ts AND
      (num_value, int_value, bool_value, str_value)
      IS NOT (excluded.num_value, excluded.int_value, excluded.bool_value, excluded.str_value))
"""
_AGG_SQL = {
    "avg": "avg(num)",
    "min": "min(num)",
    "max": "max(num)",
    "sum": "total(num)",  # total() is a float like avg; sum() of no rows is NULL anyway
    "count": "count(*)",
}
_TENANT_COLS = "id, name, created_at, retention_days"
_USER_COLS = "id, username, role, tenant_id, password_hash, created_at, token_version"
_DEVICE_COLS = "id, tenant_id, name, status, created_at"


def _uuid(value: bytes | None) -> UUID | None:
    return None if value is None else UUID(bytes=value)


def _blob(value: UUID | None) -> bytes | None:
    return None if value is None else value.bytes


def _tenant(row: Any) -> Tenant:
    return Tenant(UUID(bytes=row[0]), row[1], row[2], row[3])


def _user(row: Any) -> User:
    return User(
        id=UUID(bytes=row[0]),
        username=row[1],
        role=Role(row[2]),
        tenant_id=_uuid(row[3]),
        password_hash=row[4],
        created_at=row[5],
        token_version=row[6],
    )


def _device(row: Any) -> Device:
    return Device(UUID(bytes=row[0]), UUID(bytes=row[1]), row[2], row[3], row[4])


def _placeholders(n: int) -> str:
    return ", ".join("?" * n)


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""
    # IMMEDIATE takes the write lock at once, so a busy database waits (busy timeout)
    # here instead of failing later on a read-to-write lock upgrade.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _split_statements(script: str) -> list[str]:
    """The statements of an SQL script (sqlite3.executescript would COMMIT first)."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not all(
        part.strip().startswith("--") or not part.strip() for part in buffer.splitlines()
    ):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {buffer!r}")
    return statements


class SqliteStore:
    """The `Store` on an SQLite file; reusable, not reentrant."""

    def __init__(self, path: str | Path, *, busy_timeout: float = 5.0) -> None:
        """Remember the file; nothing is opened before `__aenter__`."""
        self._path = str(path)
        self._busy_timeout = busy_timeout
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    # --- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        """Open (creating the file and its directory) and apply schema migrations."""
        if self._executor is not None:
            raise RuntimeError("SqliteStore is already open")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iiot-sqlite")
        try:
            await self._call(self._open)
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the connection and stop the worker thread."""
        await self._shutdown()

    async def _shutdown(self) -> None:
        executor = self._executor
        if executor is None:
            return
        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, self._close)
        self._executor = None
        executor.shutdown(wait=False)

    def _open(self) -> None:
        if self._path != ":memory:" and not self._path.startswith("file:"):
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self._path, timeout=self._busy_timeout, isolation_level=None, uri=True
        )
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.execute("PRAGMA optimize")  # keeps the query planner's statistics fresh
            finally:
                conn.close()

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        # One transaction holding the write lock: a second process starting at the same
        # time waits, then finds every version applied.
        with _transaction(conn):
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
            )
            applied = {r[0] for r in conn.execute("SELECT version FROM schema_version")}
            for migration in _common.load_migrations("sqlite"):
                if migration.version in applied:
                    continue
                log.info("applying SQLite migration %s", migration.name)
                for statement in _split_statements(migration.sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, _common.now_ms()),
                )

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the worker thread; an unusable database is `StorageUnavailable`."""
        if self._executor is None:
            raise RuntimeError("SqliteStore is not open (use `async with`)")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:
            if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _UNAVAILABLE_CODES:
                raise StorageUnavailable(f"SQLite database {self._path}: {exc}") from exc
            raise

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("SqliteStore is not open (use `async with`)")
        return self._conn

    async def ping(self) -> None:
        """Raise `StorageUnavailable` when the database cannot answer now."""
        await self._call(lambda: self._db.execute("SELECT 1").fetchone())

    # --- tenants -----------------------------------------------------------------------
    async def create_tenant(self, name: str) -> Tenant:
        """Create a tenant; `Conflict` if the name is taken."""

        def run() -> Tenant:
            tenant = Tenant(uuid4(), name, _common.now_ms(), None)
            try:
                self._db.execute(
                    "INSERT INTO tenants (id, name, created_at) VALUES (?, ?, ?)",
                    (tenant.id.bytes, name, tenant.created_at),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"a tenant named {name!r} already exists") from exc
            return tenant

        return await self._call(run)

    def _tenant_row(self, scope: Scope, tenant_id: UUID) -> Tenant:
        row = None
        if scope is None or scope == tenant_id:
            row = self._db.execute(
                f"SELECT {_TENANT_COLS} FROM tenants WHERE id = ?", (tenant_id.bytes,)
            ).fetchone()
        if row is None:
            raise NotFound(f"tenant {tenant_id} not found")
        return _tenant(row)

    async def get_tenant(self, scope: Scope, tenant_id: UUID) -> Tenant:
        """One tenant visible in the scope."""
        return await self._call(self._tenant_row, scope, tenant_id)

    async def list_tenants(self, scope: Scope, limit: int, offset: int) -> Page[Tenant]:
        """Tenants visible in the scope, by name."""
        _common.check_page(limit, offset)

        def run() -> Page[Tenant]:
            where, args = ("", ()) if scope is None else ("WHERE id = ?", (scope.bytes,))
            total = self._db.execute(f"SELECT count(*) FROM tenants {where}", args).fetchone()
            rows = self._db.execute(
                f"SELECT {_TENANT_COLS} FROM tenants {where} ORDER BY name LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
            return Page([_tenant(r) for r in rows], total[0])

        return await self._call(run)

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
        if retention_days is not None and retention_days <= 0:
            raise InvalidRequest(f"retention_days must be > 0 (got {retention_days})")

        def run() -> Tenant:
            with _transaction(self._db):
                current = self._tenant_row(scope, tenant_id)
                retention = None if clear_retention else (retention_days or current.retention_days)
                try:
                    self._db.execute(
                        "UPDATE tenants SET name = ?, retention_days = ? WHERE id = ?",
                        (name or current.name, retention, tenant_id.bytes),
                    )
                except sqlite3.IntegrityError as exc:
                    raise Conflict(f"a tenant named {name!r} already exists") from exc
                return self._tenant_row(scope, tenant_id)

        return await self._call(run)

    async def delete_tenant(self, scope: Scope, tenant_id: UUID) -> None:
        """Delete a tenant with its users, devices and telemetry."""

        def run() -> None:
            with _transaction(self._db):
                self._tenant_row(scope, tenant_id)
                # Telemetry has no foreign key (bulk-insert speed): remove it explicitly.
                self._db.execute(
                    "DELETE FROM telemetry WHERE device_id IN"
                    " (SELECT id FROM devices WHERE tenant_id = ?)",
                    (tenant_id.bytes,),
                )
                self._db.execute("DELETE FROM tenants WHERE id = ?", (tenant_id.bytes,))

        await self._call(run)

    # --- users -------------------------------------------------------------------------
    async def create_user(
        self, tenant_id: UUID | None, username: str, password_hash: str, role: Role
    ) -> User:
        """Create a user; usernames are unique across the platform (`Conflict`)."""
        role = Role(role)
        _common.check_user_tenant(role, tenant_id)

        def run() -> User:
            user = User(uuid4(), username, role, tenant_id, password_hash, _common.now_ms())
            try:
                self._db.execute(
                    "INSERT INTO users (id, username, password_hash, role, tenant_id, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        user.id.bytes,
                        username,
                        password_hash,
                        role.value,
                        _blob(tenant_id),
                        user.created_at,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                if "FOREIGN KEY" in str(exc):
                    raise NotFound(f"tenant {tenant_id} not found") from exc
                raise Conflict(f"a user named {username!r} already exists") from exc
            return user

        return await self._call(run)

    def _user_row(self, scope: Scope, user_id: UUID) -> User:
        sql = f"SELECT {_USER_COLS} FROM users WHERE id = ?"
        args: tuple[Any, ...] = (user_id.bytes,)
        if scope is not None:
            sql += " AND tenant_id = ?"
            args += (scope.bytes,)
        row = self._db.execute(sql, args).fetchone()
        if row is None:
            raise NotFound(f"user {user_id} not found")
        return _user(row)

    async def get_user(self, scope: Scope, user_id: UUID) -> User:
        """One user visible in the scope."""
        return await self._call(self._user_row, scope, user_id)

    async def find_user(self, username: str) -> User | None:
        """The user with this username, for login (not scoped)."""

        def run() -> User | None:
            row = self._db.execute(
                f"SELECT {_USER_COLS} FROM users WHERE username = ?", (username,)
            ).fetchone()
            return None if row is None else _user(row)

        return await self._call(run)

    async def count_users(self) -> int:
        """How many users exist (to create the first administrator)."""
        row = await self._call(lambda: self._db.execute("SELECT count(*) FROM users").fetchone())
        return int(row[0])

    async def list_users(self, scope: Scope, limit: int, offset: int) -> Page[User]:
        """Users visible in the scope, by username."""
        _common.check_page(limit, offset)

        def run() -> Page[User]:
            where, args = ("", ()) if scope is None else ("WHERE tenant_id = ?", (scope.bytes,))
            total = self._db.execute(f"SELECT count(*) FROM users {where}", args).fetchone()
            rows = self._db.execute(
                f"SELECT {_USER_COLS} FROM users {where} ORDER BY username LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
            return Page([_user(r) for r in rows], total[0])

        return await self._call(run)

    async def update_user(
        self,
        scope: Scope,
        user_id: UUID,
        *,
        password_hash: str | None = None,
        role: Role | None = None,
    ) -> User:
        """Change a user's password hash or role."""

        def run() -> User:
            with _transaction(self._db):
                current = self._user_row(scope, user_id)
                new_role = current.role if role is None else Role(role)
                _common.check_user_tenant(new_role, current.tenant_id)
                self._db.execute(
                    "UPDATE users SET password_hash = ?, role = ?,"
                    " token_version = token_version + ? WHERE id = ?",
                    (
                        password_hash or current.password_hash,
                        new_role.value,
                        0 if password_hash is None and role is None else 1,
                        user_id.bytes,
                    ),
                )
                return self._user_row(scope, user_id)

        return await self._call(run)

    async def delete_user(self, scope: Scope, user_id: UUID) -> None:
        """Delete a user."""

        def run() -> None:
            with _transaction(self._db):
                self._user_row(scope, user_id)
                self._db.execute("DELETE FROM users WHERE id = ?", (user_id.bytes,))

        await self._call(run)

    # --- devices -----------------------------------------------------------------------
    async def create_device(self, tenant_id: UUID, name: str, token_hash: str) -> Device:
        """Create an `active` device; `Conflict` if the name is taken in the tenant."""

        def run() -> Device:
            device = Device(uuid4(), tenant_id, name, "active", _common.now_ms())
            try:
                self._db.execute(
                    "INSERT INTO devices (id, tenant_id, name, status, token_hash, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        device.id.bytes,
                        tenant_id.bytes,
                        name,
                        device.status,
                        token_hash,
                        device.created_at,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise _device_error(exc, name, tenant_id) from exc
            return device

        return await self._call(run)

    def _device_row(self, scope: Scope, device_id: UUID) -> Device:
        sql = f"SELECT {_DEVICE_COLS} FROM devices WHERE id = ?"
        args: tuple[Any, ...] = (device_id.bytes,)
        if scope is not None:
            sql += " AND tenant_id = ?"
            args += (scope.bytes,)
        row = self._db.execute(sql, args).fetchone()
        if row is None:
            raise NotFound(f"device {device_id} not found")
        return _device(row)

    async def get_device(self, scope: Scope, device_id: UUID) -> Device:
        """One device visible in the scope."""
        return await self._call(self._device_row, scope, device_id)

    async def find_device_by_token_hash(self, token_hash: str) -> Device | None:
        """The device whose token hashes to this value (not scoped: the token is the proof)."""

        def run() -> Device | None:
            row = self._db.execute(
                f"SELECT {_DEVICE_COLS} FROM devices WHERE token_hash = ?", (token_hash,)
            ).fetchone()
            return None if row is None else _device(row)

        return await self._call(run)

    async def list_devices(self, scope: Scope, limit: int, offset: int) -> Page[Device]:
        """Devices visible in the scope, by name."""
        _common.check_page(limit, offset)

        def run() -> Page[Device]:
            where, args = ("", ()) if scope is None else ("WHERE tenant_id = ?", (scope.bytes,))
            total = self._db.execute(f"SELECT count(*) FROM devices {where}", args).fetchone()
            rows = self._db.execute(
                f"SELECT {_DEVICE_COLS} FROM devices {where} ORDER BY name, id LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
            return Page([_device(r) for r in rows], total[0])

        return await self._call(run)

    async def update_device(
        self,
        scope: Scope,
        device_id: UUID,
        *,
        name: str | None = None,
        status: str | None = None,
    ) -> Device:
        """Rename a device or change its status."""

        def run() -> Device:
            with _transaction(self._db):
                current = self._device_row(scope, device_id)
                try:
                    self._db.execute(
                        "UPDATE devices SET name = ?, status = ? WHERE id = ?",
                        (name or current.name, status or current.status, device_id.bytes),
                    )
                except sqlite3.IntegrityError as exc:
                    raise _device_error(exc, name or "", current.tenant_id) from exc
                return self._device_row(scope, device_id)

        return await self._call(run)

    async def set_device_token_hash(self, scope: Scope, device_id: UUID, token_hash: str) -> None:
        """Replace a device's token hash (rotation)."""

        def run() -> None:
            with _transaction(self._db):
                current = self._device_row(scope, device_id)
                try:
                    self._db.execute(
                        "UPDATE devices SET token_hash = ? WHERE id = ?",
                        (token_hash, device_id.bytes),
                    )
                except sqlite3.IntegrityError as exc:
                    raise _device_error(exc, current.name, current.tenant_id) from exc

        await self._call(run)

    async def delete_device(self, scope: Scope, device_id: UUID) -> None:
        """Delete a device and its telemetry."""

        def run() -> None:
            with _transaction(self._db):
                self._device_row(scope, device_id)
                self._db.execute("DELETE FROM telemetry WHERE device_id = ?", (device_id.bytes,))
                self._db.execute("DELETE FROM devices WHERE id = ?", (device_id.bytes,))

        await self._call(run)

    # --- telemetry ---------------------------------------------------------------------
    async def write_points(self, batch: Sequence[DevicePoints]) -> None:
        """Store points in one transaction and update latest values.

        Idempotent: a (device, key, ts) already stored keeps one row (the newer value wins).
        Points of devices deleted meanwhile are skipped (logged), so that the rest of the
        batch commits and a pipeline never retries a batch forever. Raises
        `StorageUnavailable` when the database cannot be used now; then nothing of the
        batch is committed and the caller may retry it whole.
        """
        rows = _common.batch_rows(batch)
        if rows.rows:
            await self._call(self._write, rows)

    def _write(self, rows: _common.BatchRows) -> None:
        db = self._db
        with _transaction(db):
            # Inside the write transaction no other writer can delete a device meanwhile.
            alive: set[UUID] = set()
            for i in range(0, len(rows.device_ids), _CHUNK):
                chunk = [d.bytes for d in rows.device_ids[i : i + _CHUNK]]
                alive.update(
                    UUID(bytes=r[0])
                    for r in db.execute(
                        f"SELECT id FROM devices WHERE id IN ({_placeholders(len(chunk))})", chunk
                    )
                )
            if len(alive) != len(rows.device_ids):
                kept = rows.without(alive)
                log.warning(
                    "skipped %d points of %d deleted device(s)",
                    len(rows.rows) - len(kept.rows),
                    len(rows.device_ids) - len(alive),
                )
                rows = kept
            blobs = {d: d.bytes for d in rows.device_ids}
            # Each row is its own statement here, so repeats within the batch need no
            # dedup: they are applied in order and the last one wins.
            db.executemany(_UPSERT_TELEMETRY, [(blobs[r[0]], *r[1:]) for r in rows.rows])
            db.executemany(_UPSERT_LATEST, [(blobs[r[0]], *r[1:]) for r in rows.newest])

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

        def run() -> dict[str, list[tuple[int, Scalar]]]:
            db = self._db
            self._device_row(scope, device_id)
            keys = self._keys(device_id, query.keys)
            if not keys or query.end <= query.start or query.limit == 0:
                return {}
            result: dict[str, list[tuple[int, Scalar]]] = {}
            if query.agg == "none":
                for key in keys:
                    rows = db.execute(
                        f"SELECT ts, {_VALUE_COLS} FROM telemetry"
                        " WHERE device_id = ? AND key = ? AND ts >= ? AND ts < ?"
                        f" ORDER BY ts {direction} LIMIT ?",
                        (device_id.bytes, key, query.start, query.end, query.limit),
                    ).fetchall()
                    if rows:
                        result[key] = [(r[0], _common.value_from_columns(*r[1:])) for r in rows]
                return result
            convert: Callable[[Any], Scalar] = int if query.agg == "count" else float
            iv = query.interval_ms
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i : i + _CHUNK]
                names = {f"k{j}": key for j, key in enumerate(chunk)}
                rows = db.execute(
                    f"""
                    WITH p AS (
                        SELECT key, ts - ((ts % :iv) + :iv) % :iv AS bucket,
                               coalesce(num_value, int_value) AS num
                        FROM telemetry
                        WHERE device_id = :dev AND key IN ({", ".join(":" + n for n in names)})
                          AND ts >= :start AND ts < :end
                    ), g AS (
                        SELECT key, bucket, {_AGG_SQL[query.agg]} AS value
                        FROM p GROUP BY key, bucket
                        HAVING {"1" if query.agg == "count" else "count(num) > 0"}
                    ), r AS (
                        SELECT key, bucket, value, row_number() OVER
                               (PARTITION BY key ORDER BY bucket {direction}) AS n
                        FROM g
                    )
                    SELECT key, bucket, value FROM r WHERE n <= :limit
                    ORDER BY key, bucket {direction}
                    """,
                    {
                        "iv": iv,
                        "dev": device_id.bytes,
                        "start": query.start,
                        "end": query.end,
                        "limit": query.limit,
                        **names,
                    },
                ).fetchall()
                for key, bucket, value in rows:
                    result.setdefault(key, []).append((bucket, convert(value)))
            return result

        return await self._call(run)

    def _keys(self, device_id: UUID, keys: tuple[str, ...] | None) -> list[str]:
        if keys is not None:
            return list(dict.fromkeys(keys))
        # Every key ever written has a latest row: far cheaper than scanning telemetry.
        rows = self._db.execute(
            "SELECT key FROM telemetry_latest WHERE device_id = ? ORDER BY key",
            (device_id.bytes,),
        )
        return [r[0] for r in rows]

    async def latest(
        self, scope: Scope, device_id: UUID, keys: Sequence[str] | None = None
    ) -> dict[str, Point]:
        """The newest point (largest ts) of each key of a device."""
        wanted = None if keys is None else set(keys)

        def run() -> dict[str, Point]:
            self._device_row(scope, device_id)
            rows = self._db.execute(
                f"SELECT key, ts, {_VALUE_COLS} FROM telemetry_latest"
                " WHERE device_id = ? ORDER BY key",
                (device_id.bytes,),
            )
            return {
                r[0]: Point(r[0], r[1], _common.value_from_columns(*r[2:]))
                for r in rows
                if wanted is None or r[0] in wanted
            }

        return await self._call(run)

    async def delete_telemetry_before(self, tenant_id: UUID, before_ts: int) -> int:
        """Delete a tenant's raw telemetry older than `before_ts`; returns rows removed.

        Works in small batches, each its own short write transaction, one (device, key)
        range of the primary key at a time: the write lock is released between batches, so
        ingestion keeps committing while old data goes.
        """
        batch = 5000  # rows per write transaction: a few tens of ms of write lock at most

        def series() -> list[tuple[bytes, str]]:
            # Every key ever written has a latest row (kept by retention): the index ranges.
            return [
                (r[0], r[1])
                for r in self._db.execute(
                    "SELECT l.device_id, l.key FROM telemetry_latest l"
                    " JOIN devices d ON d.id = l.device_id WHERE d.tenant_id = ?"
                    " ORDER BY l.device_id, l.key",
                    (tenant_id.bytes,),
                )
            ]

        def chunk(device_id: bytes, key: str) -> int:
            with _transaction(self._db):
                # The batch ends at the batch-th oldest expired point (ts is unique within
                # a series), so each DELETE is one bounded index range.
                cursor = self._db.execute(
                    "DELETE FROM telemetry WHERE device_id = :d AND key = :k AND ts <"
                    " coalesce((SELECT ts + 1 FROM telemetry WHERE device_id = :d AND key = :k"
                    "  AND ts < :before ORDER BY ts LIMIT 1 OFFSET :n - 1), :before)",
                    {"d": device_id, "k": key, "before": before_ts, "n": batch},
                )
                return cursor.rowcount

        removed = 0
        for device_id, key in await self._call(series):
            while True:
                # One call per batch: other store calls run between them on the worker.
                deleted = await self._call(chunk, device_id, key)
                removed += deleted
                if deleted < batch:
                    break
        return removed


def _device_error(exc: sqlite3.IntegrityError, name: str, tenant_id: UUID) -> Exception:
    message = str(exc)
    if "FOREIGN KEY" in message:
        return NotFound(f"tenant {tenant_id} not found")
    if "token_hash" in message:
        return Conflict("this device token is already in use")
    return Conflict(f"a device named {name!r} already exists in this tenant")
