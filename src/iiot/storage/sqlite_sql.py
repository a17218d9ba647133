"""SQLite helpers shared by the store's modules: write transactions, statement sizes, ids."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from uuid import UUID

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
