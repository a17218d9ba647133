"""`SqliteStore`: the embedded, zero-setup `Store` on the standard library's sqlite3.

One dedicated worker thread owns the only connection. Each store method runs there as
one synchronous function, start to end, so a transaction never interleaves with another
coroutine's statements and no lock is needed in Python. The database runs in WAL mode with
`synchronous=FULL`: readers in other processes (backups) never block the writer, and every
commit is on disk before a device is acknowledged, even across a power cut (the pipeline's
batching keeps the number of fsyncs low).

Here: the lifecycle, tenants and devices. Users, device lookups and presence, telemetry and
MQTT sessions are mixins of their own (`sqlite_users`, `sqlite_devices`, `sqlite_telemetry`,
`sqlite_mqtt_sessions`); the schema scripts are applied by `sqlite_migrations`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self, TypeVar
from uuid import UUID, uuid4

from iiot.errors import Conflict, InvalidRequest, NotFound, StorageUnavailable
from iiot.filemodes import secure_file
from iiot.model import Device, Tenant
from iiot.storage import _common
from iiot.storage.base import DeviceFilter, Page, Scope
from iiot.storage.control_sqlite import SqliteControlStore
from iiot.storage.device_filters import device_where
from iiot.storage.sqlite_devices import DEVICE_COLS, SqliteDevices, device_from_row
from iiot.storage.sqlite_migrations import apply_migrations
from iiot.storage.sqlite_mqtt_sessions import SqliteMqttSessions
from iiot.storage.sqlite_purge import queue_purges
from iiot.storage.sqlite_reads import SqliteReader, read_connection

# Helpers that moved with the telemetry code, still at hand for the methods here.
from iiot.storage.sqlite_sql import _CHUNK, _VALUE_COLS, _blob, _placeholders, _transaction  # noqa: F401
from iiot.storage.sqlite_telemetry import SqliteTelemetry
from iiot.storage.sqlite_users import SqliteUsers

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

_TENANT_COLS = "id, name, created_at, retention_days"
_DEVICE_COLS = DEVICE_COLS


def _tenant(row: Any) -> Tenant:
    return Tenant(UUID(bytes=row[0]), row[1], row[2], row[3])


_device = device_from_row


class SqliteStore(SqliteTelemetry, SqliteUsers, SqliteDevices, SqliteMqttSessions):
    """The `Store` on an SQLite file; reusable, not reentrant."""

    def __init__(self, path: str | Path, *, busy_timeout: float = 5.0) -> None:
        """Remember the file; nothing is opened before `__aenter__`."""
        self._path = str(path)
        self._busy_timeout = busy_timeout
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._reader: SqliteReader | None = None  # queries' own connection (sqlite_reads)
        self._background: list[asyncio.Task[None]] = []
        self.control = SqliteControlStore(self._call, lambda: self._db)  # commands, attributes

    # --- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        """Open (creating the file and its directory) and apply schema migrations."""
        if self._executor is not None:
            raise RuntimeError("SqliteStore is already open")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iiot-sqlite")
        try:
            await self._call(self._open)
            if SqliteReader.usable(self._path):
                self._reader = await SqliteReader.open(self._path, self._busy_timeout)
        except BaseException:
            await self._shutdown()
            raise
        self._start_background()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the connection and stop the worker thread."""
        await self._shutdown()

    async def _shutdown(self) -> None:
        executor = self._executor
        if executor is None:
            return
        await self._stop_background()
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.close()
        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, self._close)
        self._executor = None
        executor.shutdown(wait=False)

    def _open(self) -> None:
        if self._path != ":memory:" and not self._path.startswith("file:"):
            Path(self._path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # It holds password and token hashes; SQLite gives -wal/-shm the same mode.
            secure_file(Path(self._path))
        conn = sqlite3.connect(
            self._path, timeout=self._busy_timeout, isolation_level=None, uri=True
        )
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            apply_migrations(conn)
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

    async def _read_call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a read-only `fn(*args)` on the reader's thread (the writer's without one)."""
        if self._reader is None:
            return await self._call(fn, *args)
        try:
            return await self._reader.run(fn, *args)
        except sqlite3.OperationalError as exc:
            if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _UNAVAILABLE_CODES:
                raise StorageUnavailable(f"SQLite database {self._path}: {exc}") from exc
            raise

    @property
    def _db(self) -> sqlite3.Connection:
        reading = read_connection()  # set on the reader's thread only
        if reading is not None:
            return reading
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

        return await self._read_call(run)

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

        def run() -> list[UUID]:
            with _transaction(self._db):
                self._tenant_row(scope, tenant_id)
                # Telemetry has no foreign key (bulk-insert speed): it is purged after the
                # commit, a batch at a time (sqlite_purge).
                ids = [
                    UUID(bytes=r[0])
                    for r in self._db.execute(
                        "SELECT id FROM devices WHERE tenant_id = ?", (tenant_id.bytes,)
                    )
                ]
                queue_purges(self._db, ids)
                self._db.execute("DELETE FROM tenants WHERE id = ?", (tenant_id.bytes,))
                return ids

        await self._purge(await self._call(run))

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

        def run() -> Device:
            device = Device(uuid4(), tenant_id, name, "active", _common.now_ms(), type, gateway_id)
            try:
                self._db.execute(
                    "INSERT INTO devices"
                    " (id, tenant_id, name, status, token_hash, created_at, type, gateway_id)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        device.id.bytes,
                        tenant_id.bytes,
                        name,
                        device.status,
                        token_hash,
                        device.created_at,
                        type,
                        _blob(gateway_id),
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

    async def list_devices(
        self, scope: Scope, limit: int, offset: int, filters: DeviceFilter | None = None
    ) -> Page[Device]:
        """Devices visible in the scope (and matching the filter), by name."""
        _common.check_page(limit, offset)
        args: list[Any] = []

        def param(value: Any) -> str:
            args.append(value)
            return "?"

        where = device_where(scope, filters, param, uuid=_blob, like="LIKE")

        def run() -> Page[Device]:
            total = self._db.execute(f"SELECT count(*) FROM devices {where}", args).fetchone()
            rows = self._db.execute(
                f"SELECT {_DEVICE_COLS} FROM devices {where} ORDER BY name, id LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
            return Page([_device(r) for r in rows], total[0])

        return await self._read_call(run)

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

        def run() -> Device:
            with _transaction(self._db):
                current = self._device_row(scope, device_id)
                try:
                    self._db.execute(
                        "UPDATE devices SET name = ?, status = ?, type = ? WHERE id = ?",
                        (
                            name or current.name,
                            status or current.status,
                            type or current.type,
                            device_id.bytes,
                        ),
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
                # Its points are purged after the commit, a batch at a time (sqlite_purge).
                queue_purges(self._db, [device_id])
                self._db.execute("DELETE FROM devices WHERE id = ?", (device_id.bytes,))

        await self._call(run)
        await self._purge([device_id])


def _device_error(exc: sqlite3.IntegrityError, name: str, tenant_id: UUID) -> Exception:
    message = str(exc)
    if "FOREIGN KEY" in message:
        return NotFound(f"tenant {tenant_id} not found")
    if "token_hash" in message:
        return Conflict("this device token is already in use")
    return Conflict(f"a device named {name!r} already exists in this tenant")
