"""`ControlStore` on SQLite: commands, their transitions and attributes (migration 0006).

Runs on the `SqliteStore`'s single worker thread, so each method is one transaction that
no other statement interleaves with; state changes are conditional UPDATEs
(`WHERE status IN (allowed)`) with their transition row in the same transaction.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar
from uuid import UUID, uuid4

from iiot.errors import NotFound
from iiot.storage.base import Page, Scope
from iiot.storage.control import (
    UNSET,
    Answered,
    AttributeValue,
    Claimed,
    Command,
    NewCommand,
    in_flight_sql,
)

__all__ = ["SqliteControlStore"]

T = TypeVar("T")

_COLS = (
    "id, tenant_id, device_id, method, params, oneway, persistent, timeout_ms, expires_at,"
    " retries, attempts, status, response, error, sent_by, deadline, created_at, updated_at"
)


def _b(value: UUID | None) -> bytes | None:
    return None if value is None else value.bytes


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _is_next(*, unexpired: bool) -> str:
    """The row `commands` is its device's next command: none other in flight, none older
    QUEUED (`unexpired`: only those expiring after the `?` argument count)."""
    expiry = " AND o.expires_at > ?" if unexpired else ""
    return (
        "NOT EXISTS (SELECT 1 FROM commands o"
        " WHERE o.device_id = commands.device_id AND o.id <> commands.id"
        f" AND ((o.status IN ('SENT', 'DELIVERED', 'TIMEOUT') AND {in_flight_sql('o')})"
        f" OR (o.status = 'QUEUED'{expiry}"
        " AND (o.created_at, o.id) < (commands.created_at, commands.id))))"
    )


def _command(row: Any, transitions: list[tuple[str, int]] | None = None) -> Command:
    return Command(
        id=UUID(bytes=row[0]),
        tenant_id=UUID(bytes=row[1]),
        device_id=UUID(bytes=row[2]),
        method=row[3],
        params=json.loads(row[4]),
        oneway=bool(row[5]),
        persistent=bool(row[6]),
        timeout_ms=row[7],
        expires_at=row[8],
        retries=row[9],
        attempts=row[10],
        status=row[11],
        response=None if row[12] is None else json.loads(row[12]),
        error=row[13],
        sent_by=None if row[14] is None else UUID(bytes=row[14]),
        deadline=row[15],
        created_at=row[16],
        updated_at=row[17],
        transitions=transitions or [],
    )


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SqliteControlStore:
    """Commands and attributes through the `SqliteStore`'s worker thread."""

    def __init__(
        self,
        call: Callable[..., Awaitable[Any]],
        db: Callable[[], sqlite3.Connection],
    ) -> None:
        """`call(fn)` runs `fn` on the store's thread; `db()` is its connection."""
        self._call = call
        self._db = db

    def _check_device(self, scope: Scope, device_id: UUID) -> None:
        row = (
            self._db()
            .execute(
                "SELECT 1 FROM devices WHERE id = ? AND (? IS NULL OR tenant_id = ?)",
                (device_id.bytes, _b(scope), _b(scope)),
            )
            .fetchone()
        )
        if row is None:
            raise NotFound(f"device {device_id} not found")

    def _with_transitions(self, rows: Sequence[Any]) -> list[Command]:
        if not rows:
            return []
        ids = [r[0] for r in rows]
        found: dict[bytes, list[tuple[str, int]]] = {}
        for cid, status, ts in self._db().execute(
            f"SELECT command_id, status, ts FROM command_transitions"
            f" WHERE command_id IN ({_marks(len(ids))}) ORDER BY seq",
            ids,
        ):
            found.setdefault(cid, []).append((status, ts))
        return [_command(r, found.get(r[0], [])) for r in rows]

    async def create_command(
        self, scope: Scope, command: NewCommand, now: int, *, claim: bool = False
    ) -> Command:
        """Store a QUEUED command with its first transition (SENT at once with `claim`,
        unless another QUEUED command of the device is ahead of it)."""

        def run() -> Command:
            db = self._db()
            with _transaction(db):
                self._check_device(scope, command.device_id)
                sent = (
                    claim
                    and not db.execute(
                        "SELECT EXISTS (SELECT 1 FROM commands WHERE device_id = ?"
                        " AND status = 'QUEUED' AND expires_at > ?)",
                        (command.device_id.bytes, now),
                    ).fetchone()[0]
                )
                cid = uuid4()
                row = db.execute(
                    f"INSERT INTO commands ({_COLS}) VALUES"
                    " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?, ?, ?)"
                    f" RETURNING {_COLS}",
                    (
                        cid.bytes,
                        command.tenant_id.bytes,
                        command.device_id.bytes,
                        command.method,
                        json.dumps(command.params),
                        command.oneway,
                        command.persistent,
                        command.timeout_ms,
                        command.expires_at,
                        command.retries,
                        1 if sent else 0,
                        "SENT" if sent else "QUEUED",
                        _b(command.sent_by),
                        now + command.timeout_ms if sent else None,
                        now,
                        now,
                    ),
                ).fetchone()
                history = [("QUEUED", now), *([("SENT", now)] if sent else [])]
                db.executemany(
                    "INSERT INTO command_transitions (command_id, status, ts) VALUES (?, ?, ?)",
                    [(cid.bytes, status, ts) for status, ts in history],
                )
            return _command(row, history)

        result: Command = await self._call(run)
        return result

    async def get_command(self, scope: Scope, command_id: UUID) -> Command:
        """One command with its transitions."""

        def run() -> Command:
            row = (
                self._db()
                .execute(
                    f"SELECT {_COLS} FROM commands WHERE id = ? AND (? IS NULL OR tenant_id = ?)",
                    (command_id.bytes, _b(scope), _b(scope)),
                )
                .fetchone()
            )
            if row is None:
                raise NotFound(f"command {command_id} not found")
            return self._with_transitions([row])[0]

        result: Command = await self._call(run)
        return result

    async def list_commands(
        self, scope: Scope, device_id: UUID, status: str | None, limit: int, offset: int
    ) -> Page[Command]:
        """A device's commands, newest first."""

        def run() -> Page[Command]:
            self._check_device(scope, device_id)
            where = "device_id = ? AND (? IS NULL OR status = ?)"
            args = (device_id.bytes, status, status)
            total = self._db().execute(f"SELECT count(*) FROM commands WHERE {where}", args)
            count = total.fetchone()[0]
            rows = (
                self._db()
                .execute(
                    f"SELECT {_COLS} FROM commands WHERE {where}"
                    " ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                    (*args, limit, offset),
                )
                .fetchall()
            )
            return Page(self._with_transitions(rows), count)

        result: Page[Command] = await self._call(run)
        return result

    async def transition_command(
        self,
        scope: Scope,
        command_id: UUID,
        to: str,
        allowed_from: Sequence[str],
        now: int,
        *,
        device_id: UUID | None = None,
        deadline: int | None = None,
        response: Any = UNSET,
        error: str | None = None,
        add_attempts: int = 0,
        only_if_next: bool = False,
    ) -> Command | None:
        """Conditional move with its transition row, in one transaction (its write lock,
        taken at BEGIN IMMEDIATE, keeps an `only_if_next` check true until the move)."""

        def run() -> Command | None:
            db = self._db()
            with _transaction(db):
                row = db.execute(
                    "UPDATE commands SET status = ?, updated_at = ?, deadline = ?,"
                    " response = CASE WHEN ? THEN ? ELSE response END,"
                    " error = coalesce(?, error), attempts = attempts + ?"
                    f" WHERE id = ? AND status IN ({_marks(len(allowed_from))})"
                    " AND (? IS NULL OR tenant_id = ?) AND (? IS NULL OR device_id = ?)"
                    " AND NOT (oneway AND ? = 'SUCCESSFUL')"  # a one-way command has no answer
                    f" AND (NOT ? OR {_is_next(unexpired=False)})"
                    f" RETURNING {_COLS}",
                    (
                        to,
                        now,
                        deadline,
                        response is not UNSET,
                        None if response is UNSET else json.dumps(response),
                        error,
                        add_attempts,
                        command_id.bytes,
                        *allowed_from,
                        _b(scope),
                        _b(scope),
                        _b(device_id),
                        _b(device_id),
                        to,
                        only_if_next,
                    ),
                ).fetchone()
                if row is None:
                    return None
                db.execute(
                    "INSERT INTO command_transitions (command_id, status, ts) VALUES (?, ?, ?)",
                    (command_id.bytes, to, now),
                )
                return self._with_transitions([row])[0]

        result: Command | None = await self._call(run)
        return result

    async def claim_next_command(
        self, scope: Scope, device_id: UUID, now: int, *, only_if_next: bool = False
    ) -> Claimed | None:
        """The device's oldest unexpired QUEUED command, moved to SENT, in one transaction."""

        def run() -> Claimed | None:
            db = self._db()
            unexpired = "device_id = ? AND status = 'QUEUED' AND expires_at > ?"
            with _transaction(db):
                oldest = db.execute(
                    f"SELECT id FROM commands WHERE {unexpired} AND (? IS NULL OR tenant_id = ?)"
                    " ORDER BY created_at, id LIMIT 1",
                    (device_id.bytes, now, _b(scope), _b(scope)),
                ).fetchone()
                if oldest is None:
                    return None
                row = db.execute(
                    "UPDATE commands SET status = 'SENT', updated_at = ?,"
                    " deadline = ? + timeout_ms, attempts = attempts + 1"
                    f" WHERE id = ? AND (NOT ? OR {_is_next(unexpired=True)})"
                    f" RETURNING {_COLS}",
                    (now, now, oldest[0], only_if_next, now),
                ).fetchone()
                if row is None:
                    return None
                db.execute(
                    "INSERT INTO command_transitions (command_id, status, ts) VALUES (?, ?, ?)",
                    (oldest[0], "SENT", now),
                )
                more = db.execute(
                    f"SELECT EXISTS (SELECT 1 FROM commands WHERE {unexpired} AND id <> ?)",
                    (device_id.bytes, now, oldest[0]),
                ).fetchone()[0]
                return Claimed(self._with_transitions([row])[0], bool(more))

        result: Claimed | None = await self._call(run)
        return result

    async def answer_command(
        self, scope: Scope, command_id: UUID, device_id: UUID, response: Any, now: int
    ) -> Answered | None:
        """The device's answer to its open two-way command, in one transaction."""

        def run() -> Answered | None:
            db = self._db()
            with _transaction(db):
                found = db.execute(
                    "SELECT status FROM commands WHERE id = ? AND device_id = ?"
                    " AND (? IS NULL OR tenant_id = ?) AND NOT oneway"
                    " AND status IN ('QUEUED', 'SENT', 'DELIVERED', 'TIMEOUT')",
                    (command_id.bytes, device_id.bytes, _b(scope), _b(scope)),
                ).fetchone()
                if found is None:
                    return None
                row = db.execute(
                    "UPDATE commands SET status = 'SUCCESSFUL', updated_at = ?, deadline = NULL,"
                    f" response = ? WHERE id = ? RETURNING {_COLS}",
                    (now, json.dumps(response), command_id.bytes),
                ).fetchone()
                delivered_now = found[0] == "SENT"
                for status in ("DELIVERED", "SUCCESSFUL") if delivered_now else ("SUCCESSFUL",):
                    db.execute(
                        "INSERT INTO command_transitions (command_id, status, ts) VALUES (?, ?, ?)",
                        (command_id.bytes, status, now),
                    )
                return Answered(self._with_transitions([row])[0], delivered_now)

        result: Answered | None = await self._call(run)
        return result

    def _select(self, where: str, args: tuple[Any, ...]) -> list[Command]:
        rows = self._db().execute(f"SELECT {_COLS} FROM commands WHERE {where}", args)
        return [_command(r) for r in rows.fetchall()]

    async def queued_commands(self, scope: Scope, device_id: UUID, limit: int) -> list[Command]:
        """A device's QUEUED commands in creation order."""
        where = (
            "device_id = ? AND status = 'QUEUED' AND (? IS NULL OR tenant_id = ?)"
            " ORDER BY created_at, id LIMIT ?"
        )
        args = (device_id.bytes, _b(scope), _b(scope), limit)
        result: list[Command] = await self._call(self._select, where, args)
        return result

    async def due_commands(self, scope: Scope, now: int, limit: int) -> list[Command]:
        """Open commands past their deadline or expiry."""
        where = (
            "status IN ('QUEUED', 'SENT', 'DELIVERED', 'TIMEOUT')"
            " AND (deadline <= ? OR expires_at <= ?) AND (? IS NULL OR tenant_id = ?)"
            " AND NOT (status = 'DELIVERED' AND oneway)"  # final for one-way commands
            " ORDER BY created_at LIMIT ?"
        )
        args = (now, now, _b(scope), _b(scope), limit)
        result: list[Command] = await self._call(self._select, where, args)
        return result

    async def command_in_flight(self, scope: Scope, device_id: UUID) -> Command | None:
        """The device's oldest command in flight, if any."""
        where = (
            "device_id = ? AND status IN ('SENT', 'DELIVERED', 'TIMEOUT')"
            f" AND {in_flight_sql('commands')} AND (? IS NULL OR tenant_id = ?)"
            " ORDER BY created_at, id LIMIT 1"
        )
        args = (device_id.bytes, _b(scope), _b(scope))
        found: list[Command] = await self._call(self._select, where, args)
        return found[0] if found else None

    async def queued_devices(self, scope: Scope, before: int, limit: int) -> list[UUID]:
        """Devices with a command QUEUED since before `before`."""

        def run() -> list[UUID]:
            rows = self._db().execute(
                "SELECT DISTINCT device_id FROM commands WHERE status = 'QUEUED'"
                " AND updated_at <= ? AND (? IS NULL OR tenant_id = ?) LIMIT ?",
                (before, _b(scope), _b(scope), limit),
            )
            return [UUID(bytes=r[0]) for r in rows.fetchall()]

        result: list[UUID] = await self._call(run)
        return result

    async def stale_sent_commands(self, scope: Scope, limit: int) -> list[Command]:
        """Persistent commands left SENT."""
        where = (
            "status = 'SENT' AND persistent AND (? IS NULL OR tenant_id = ?)"
            " ORDER BY created_at LIMIT ?"
        )
        result: list[Command] = await self._call(self._select, where, (_b(scope), _b(scope), limit))
        return result

    async def get_attributes(
        self,
        scope: Scope,
        device_id: UUID,
        scopes: Sequence[str],
        keys: Sequence[str] | None,
    ) -> dict[str, dict[str, AttributeValue]]:
        """The device's attributes in these scopes."""

        def run() -> dict[str, dict[str, AttributeValue]]:
            self._check_device(scope, device_id)
            sql = (
                "SELECT scope, key, value, ts FROM device_attributes WHERE device_id = ?"
                f" AND scope IN ({_marks(len(scopes))})"
            )
            args: list[Any] = [device_id.bytes, *scopes]
            if keys is not None:
                sql += f" AND key IN ({_marks(len(keys))})"
                args += list(keys)
            found: dict[str, dict[str, AttributeValue]] = {s: {} for s in scopes}
            for attr_scope, key, value, ts in self._db().execute(sql + " ORDER BY key", args):
                found[attr_scope][key] = AttributeValue(json.loads(value), ts)
            return found

        result: dict[str, dict[str, AttributeValue]] = await self._call(run)
        return result

    async def set_attributes(
        self, scope: Scope, device_id: UUID, attr_scope: str, values: Mapping[str, Any], now: int
    ) -> None:
        """Merge attributes into a scope."""

        def run() -> None:
            db = self._db()
            with _transaction(db):
                self._check_device(scope, device_id)
                db.executemany(
                    "INSERT INTO device_attributes (device_id, scope, key, value, ts)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (device_id, scope, key)"
                    " DO UPDATE SET value = excluded.value, ts = excluded.ts",
                    [
                        (device_id.bytes, attr_scope, k, json.dumps(v), now)
                        for k, v in values.items()
                    ],
                )

        await self._call(run)

    async def delete_attributes(
        self, scope: Scope, device_id: UUID, attr_scope: str, keys: Sequence[str]
    ) -> list[str]:
        """Delete keys from a scope; the keys that existed."""

        def run() -> list[str]:
            db = self._db()
            with _transaction(db):
                self._check_device(scope, device_id)
                rows = db.execute(
                    "DELETE FROM device_attributes WHERE device_id = ? AND scope = ?"
                    f" AND key IN ({_marks(len(keys))}) RETURNING key",
                    (device_id.bytes, attr_scope, *keys),
                ).fetchall()
            return sorted(r[0] for r in rows)

        result: list[str] = await self._call(run)
        return result
