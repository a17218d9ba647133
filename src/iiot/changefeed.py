"""Changes made outside the running platform (by `iiot` commands) reach it at once.

A command that creates, disables or deletes a device publishes the same live events as
the REST API does, on a bus of its own. `announce` hands them to the running platform:

- PostgreSQL: NOTIFY on the live bridge's channel. Split roles and cluster nodes already
  LISTEN there (`LiveBridge`); a single `--role all` process runs a `ChangeFeed` that only
  listens.
- SQLite: a row in `live_changes` (migration 0009). `ChangeFeed` reads new rows once a
  second: one indexed query on a table that is nearly always empty of new rows.

The receiving process drops the device from its cache and publishes the event on its own
bus, so the OPC UA address space and every other subscriber follow as for a REST change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self

from iiot.bus import DeviceEvent, LiveEvent
from iiot.config import Settings
from iiot.livebridge import CHANNEL, decode, encode
from iiot.services import Services
from iiot.supervisor import cancel_and_wait, supervise

__all__ = ["POLL_INTERVAL_S", "ChangeFeed", "announce", "sqlite_path"]

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0
_KEEP_MS = 3600 * 1000  # rows older than this are removed when a new one is written


def sqlite_path(url: str) -> str | None:
    """The file of a `sqlite:///path` URL; None for other databases."""
    return url[len("sqlite:///") :] if url.startswith("sqlite:///") else None


async def announce(settings: Settings, events: Sequence[LiveEvent]) -> None:
    """Hand live events that arose in this process to running platform processes."""
    if not events:
        return
    origin = f"cli-{uuid.uuid4().hex[:12]}"
    payloads = [p for event in events for p in encode(event, origin)]
    url = settings.effective_database_url
    path = sqlite_path(url)
    if path is not None:
        await asyncio.to_thread(_append_sqlite, path, payloads)
        return
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        for payload in payloads:
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
    finally:
        await conn.close()


def _append_sqlite(path: str, payloads: list[str]) -> None:
    now = int(time.time() * 1000)
    conn = sqlite3.connect(path, timeout=10, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM live_changes WHERE created_at < ?", (now - _KEEP_MS,))
        conn.executemany(
            "INSERT INTO live_changes (created_at, payload) VALUES (?, ?)",
            [(now, payload) for payload in payloads],
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


class ChangeFeed:
    """Publishes changes made by `iiot` commands on the running platform's live bus."""

    name = "changefeed"

    def __init__(self, services: Services) -> None:
        self._services = services
        self._url = services.settings.effective_database_url
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def wanted(settings: Settings, role: str) -> bool:
        """Whether a process of this role needs a feed (split PostgreSQL roles have a bridge)."""
        url = settings.effective_database_url
        if url.startswith("sqlite:"):
            path = sqlite_path(url)  # an in-memory database has no other process to hear
            return path is not None and path != ":memory:" and not path.startswith("file:")
        return role == "all" and not settings.cluster  # a cluster node has the bridge

    def describe(self) -> str:
        """Start-up log line."""
        if sqlite_path(self._url) is not None:
            return f"changes by iiot commands: read every {POLL_INTERVAL_S:g} s"
        return f"changes by iiot commands: LISTEN on channel {CHANNEL!r}"

    async def __aenter__(self) -> Self:
        if sqlite_path(self._url) is not None:
            serve: Callable[[Callable[[], None]], Any] = self._poll_sqlite
        else:
            serve = self._listen_postgres
        self._task = asyncio.create_task(
            supervise("change feed", serve, log, lambda up, detail: None), name="changefeed"
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def _apply(self, payload: str) -> None:
        try:
            _origin, event = decode(payload)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("ignored a malformed change: %s", exc)
            return
        if isinstance(event, DeviceEvent):
            self._services.registry.forget(event.device.id)
        self._services.bus.publish(event)

    async def _poll_sqlite(self, connected: Callable[[], None]) -> None:
        path = sqlite_path(self._url)
        assert path is not None
        # One thread owns the connection: a cancelled poll leaves its call running there,
        # and closing the connection from elsewhere meanwhile crashed the process (SIGSEGV).
        # The close is queued behind that call instead.
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="changefeed")
        loop = asyncio.get_running_loop()
        conn = await loop.run_in_executor(thread, _connect_sqlite, path)
        try:
            last = await loop.run_in_executor(thread, _last_seq, conn)
            connected()
            while True:
                await asyncio.sleep(POLL_INTERVAL_S)
                rows = await loop.run_in_executor(thread, _rows_after, conn, last)
                for seq, payload in rows:
                    last = seq
                    self._apply(payload)
        finally:
            thread.submit(conn.close)
            thread.shutdown(wait=False)

    async def _listen_postgres(self, connected: Callable[[], None]) -> None:
        import asyncpg

        conn = await asyncpg.connect(self._url, timeout=10)
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        try:
            await conn.add_listener(CHANNEL, lambda _c, _p, _ch, payload: self._apply(payload))
            connected()
            await lost.wait()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)


def _connect_sqlite(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=5, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA query_only = ON")
    return conn


def _last_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT coalesce(max(seq), 0) FROM live_changes").fetchone()
    return int(row[0])


def _rows_after(conn: sqlite3.Connection, last: int) -> list[tuple[int, str]]:
    cursor = conn.execute(
        "SELECT seq, payload FROM live_changes WHERE seq > ? ORDER BY seq LIMIT 10000", (last,)
    )
    return [(int(seq), str(payload)) for seq, payload in cursor]
