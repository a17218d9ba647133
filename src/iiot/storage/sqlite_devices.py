"""Device presence, certificates and lookups by name on SQLite (a `SqliteStore` mixin)."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any, TypeVar
from uuid import UUID

from iiot.errors import Conflict
from iiot.model import Device
from iiot.storage.base import Scope
from iiot.storage.sqlite_sql import SqlitePart, _transaction

__all__ = ["DEVICE_COLS", "SqliteDevices", "device_from_row"]

T = TypeVar("T")

DEVICE_COLS = "id, tenant_id, name, status, created_at, type, gateway_id, last_seen, connected"


def device_from_row(row: Any) -> Device:
    """A device from a row of `DEVICE_COLS`."""
    gateway = None if row[6] is None else UUID(bytes=row[6])
    return Device(
        UUID(bytes=row[0]),
        UUID(bytes=row[1]),
        row[2],
        row[3],
        row[4],
        row[5],
        gateway,
        row[7],
        bool(row[8]),
    )


class SqliteDevices(SqlitePart):
    """Device methods beyond create/read/update/delete (the store provides `_call`, `_db`)."""

    def _device_row(self, scope: Scope, device_id: UUID) -> Device:
        raise NotImplementedError

    def _device_where(self, clause: str, *args: Any) -> Device | None:
        row = self._db.execute(f"SELECT {DEVICE_COLS} FROM devices WHERE {clause}", args).fetchone()
        return None if row is None else device_from_row(row)

    async def find_device_by_name(self, tenant_id: UUID, name: str) -> Device | None:
        """The tenant's device of this name (a gateway's children are found by name)."""
        return await self._call(
            self._device_where, "tenant_id = ? AND name = ?", tenant_id.bytes, name
        )

    async def find_device_by_certificate(self, fingerprint: str) -> Device | None:
        """The device whose registered client certificate has this SHA-256 fingerprint."""
        return await self._call(self._device_where, "cert_fingerprint = ?", fingerprint)

    async def set_device_certificate(
        self, scope: Scope, device_id: UUID, fingerprint: str | None
    ) -> Device:
        """Register (or, with None, remove) a device's client certificate fingerprint."""

        def run() -> Device:
            with _transaction(self._db):
                self._device_row(scope, device_id)
                try:
                    self._db.execute(
                        "UPDATE devices SET cert_fingerprint = ? WHERE id = ?",
                        (fingerprint, device_id.bytes),
                    )
                except sqlite3.IntegrityError as exc:
                    raise Conflict("this certificate is already registered to a device") from exc
                return self._device_row(scope, device_id)

        return await self._call(run)

    async def record_presence(
        self, last_seen: Mapping[UUID, int], connected: Mapping[UUID, bool]
    ) -> None:
        """Batched presence: last message times (never moved back) and connection states."""
        if not last_seen and not connected:
            return

        def run() -> None:
            with _transaction(self._db):
                self._db.executemany(
                    "UPDATE devices SET last_seen = ?1 WHERE id = ?2"
                    " AND (last_seen IS NULL OR last_seen < ?1)",
                    [(ts, device_id.bytes) for device_id, ts in last_seen.items()],
                )
                self._db.executemany(
                    "UPDATE devices SET connected = ? WHERE id = ?",
                    [(int(on), device_id.bytes) for device_id, on in connected.items()],
                )

        await self._call(run)
