"""The read path on SQLite: a read-only connection on a thread of its own.

The writer's thread runs one write transaction after another; a query queued behind them
(or a heavy query in front of them) would make both wait. In WAL mode a second connection
reads a consistent snapshot while the writer commits, so queries (telemetry, latest
values, lists) run there instead. Store methods reach whichever connection belongs to the
thread they run on through `read_connection`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

__all__ = ["SqliteReader", "read_connection"]

T = TypeVar("T")
_local = threading.local()


def read_connection() -> sqlite3.Connection | None:
    """The read-only connection of the current thread, if it is a reader's thread."""
    conn: sqlite3.Connection | None = getattr(_local, "conn", None)
    return conn


def _in_snapshot(fn: Callable[..., T], *args: Any) -> T:
    conn = _local.conn
    conn.execute("BEGIN")  # deferred: the snapshot is taken at the first read
    try:
        return fn(*args)
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


class SqliteReader:
    """One read-only connection and the thread that uses it."""

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        """Use `open`."""
        self._executor = executor

    @staticmethod
    def usable(path: str) -> bool:
        """Whether a second connection can see the same database (not `:memory:`)."""
        return path != ":memory:" and not path.startswith("file:")

    @classmethod
    async def open(cls, path: str, busy_timeout: float) -> SqliteReader:
        """Open the connection on its own thread (the writer has made the file WAL)."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iiot-sqlite-read")

        def connect() -> None:
            uri = f"file:{quote(str(Path(path).resolve()))}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            _local.conn = conn

        try:
            await asyncio.get_running_loop().run_in_executor(executor, connect)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(executor)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the reader's thread, in one read transaction: its statements
        all see the same committed data (a page's rows and its total must agree, and the
        writer commits on its own connection meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, _in_snapshot, fn, *args
        )

    async def close(self) -> None:
        """Close the connection and stop the thread."""

        def close() -> None:
            conn = getattr(_local, "conn", None)
            _local.conn = None
            if conn is not None:
                conn.close()

        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, close)
        finally:
            self._executor.shutdown(wait=False)
