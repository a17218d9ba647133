"""Schema migrations of the SQLite store: the `migrations/sqlite` scripts, applied in order."""

from __future__ import annotations

import logging
import sqlite3

from iiot.storage import _common
from iiot.storage.sqlite_sql import _transaction

__all__ = ["apply_migrations"]

log = logging.getLogger("iiot.storage.sqlite")  # the store's logger, as before the split


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


def apply_migrations(conn: sqlite3.Connection) -> None:
    """Bring the schema up to date, one transaction for every pending migration."""
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
