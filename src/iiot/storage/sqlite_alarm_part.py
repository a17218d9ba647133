"""What the parts of `SqliteAlarmStore` share: the store's connection, ids, tenant scoping."""

from __future__ import annotations

import sqlite3
from typing import Any
from uuid import UUID

from iiot.storage.base import Scope
from iiot.storage.sqlite import SqliteStore

__all__ = ["SqliteAlarmPart"]


def _uuid(raw: bytes) -> UUID:
    return UUID(bytes=raw)


def _scoped(scope: Scope, column: str = "tenant_id") -> tuple[str, tuple[Any, ...]]:
    return ("", ()) if scope is None else (f" AND {column} = ?", (scope.bytes,))


class SqliteAlarmPart:
    """Base of the parts of `SqliteAlarmStore`: the `SqliteStore` whose thread they run on."""

    def __init__(self, store: SqliteStore) -> None:
        """Share the store's connection and worker thread."""
        self._store = store

    @property
    def _db(self) -> sqlite3.Connection:
        return self._store._db
