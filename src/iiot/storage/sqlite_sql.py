"""SQLite helpers shared by the store's modules: write transactions, statement sizes, ids."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from uuid import UUID

T = TypeVar("T")

# SQLite allows 32766 host parameters per statement; stay far below it.
_CHUNK = 500

_VALUE_COLS = "num_value, int_value, bool_value, str_value"


def _placeholders(n: int) -> str:
    return ", ".join("?" * n)


def _uuid(value: bytes | None) -> UUID | None:
    return None if value is None else UUID(bytes=value)


def _blob(value: UUID | None) -> bytes | None:
    return None if value is None else value.bytes


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


class SqlitePart:
    """A part of `SqliteStore` in a module of its own (a mixin): what it uses of the store,
    which provides these."""

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    async def _read_call(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    @property
    def _db(self) -> sqlite3.Connection:
        raise NotImplementedError
