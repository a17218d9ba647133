"""SQLite helpers shared by the store's modules: write transactions and statement sizes."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

# SQLite allows 32766 host parameters per statement; stay far below it.
_CHUNK = 500

_VALUE_COLS = "num_value, int_value, bool_value, str_value"


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
