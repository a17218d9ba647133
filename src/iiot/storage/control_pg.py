"""`ControlStore` on PostgreSQL: commands, their transitions and attributes (migration 0006).

The statements that change commands are in `control_pg_sql`, each atomic by itself.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
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
from iiot.storage.control_pg_sql import ANSWER, CLAIM, COLS, CREATE, GET, TRANSITION
from iiot.storage.postgres_pool import one_snapshot

__all__ = ["PgControlStore"]

T = TypeVar("T")
Runner = Callable[..., Awaitable[Any]]


def _command(row: Any, transitions: list[tuple[str, int]] | None = None) -> Command:
    return Command(
        id=row["id"],
        tenant_id=row["tenant_id"],
        device_id=row["device_id"],
        method=row["method"],
        params=json.loads(row["params"]),
        oneway=row["oneway"],
        persistent=row["persistent"],
        timeout_ms=row["timeout_ms"],
        expires_at=row["expires_at"],
        retries=row["retries"],
        attempts=row["attempts"],
        status=row["status"],
        response=None if row["response"] is None else json.loads(row["response"]),
        error=row["error"],
        sent_by=row["sent_by"],
        deadline=row["deadline"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        transitions=transitions or [],
    )


async def _transitions(conn: Any, ids: Sequence[UUID]) -> dict[UUID, list[tuple[str, int]]]:
    rows = await conn.fetch(
        "SELECT command_id, status, ts FROM command_transitions"
        " WHERE command_id = ANY($1::uuid[]) ORDER BY command_id, seq",
        list(ids),
    )
    found: dict[UUID, list[tuple[str, int]]] = {}
    for row in rows:
        found.setdefault(row["command_id"], []).append((row["status"], row["ts"]))
    return found


async def _with_transitions(conn: Any, rows: Sequence[Any]) -> list[Command]:
    history = await _transitions(conn, [r["id"] for r in rows]) if rows else {}
    return [_command(r, history.get(r["id"], [])) for r in rows]


async def _check_device(conn: Any, scope: Scope, device_id: UUID) -> None:
    found = await conn.fetchval(
        "SELECT 1 FROM devices WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)",
        device_id,
        scope,
    )
    if found is None:
        raise NotFound(f"device {device_id} not found")


class PgControlStore:
    """Commands and attributes through the `PostgresStore`'s connection runner."""

    def __init__(self, run: Runner) -> None:
        """`run(op)` runs `op(conn)` on a pooled connection (the store's `_run`)."""
        self._run = run

    async def create_command(
        self, scope: Scope, command: NewCommand, now: int, *, claim: bool = False
    ) -> Command:
        """Store a QUEUED command with its first transition (SENT at once with `claim`,
        unless another QUEUED command of the device is ahead of it)."""

        async def op(conn: Any) -> Command:
            row = await conn.fetchrow(
                CREATE,
                uuid4(),
                command.tenant_id,
                command.device_id,
                command.method,
                json.dumps(command.params),
                command.oneway,
                command.persistent,
                command.timeout_ms,
                command.expires_at,
                command.retries,
                command.sent_by,
                now,
                scope,
                claim,
            )
            if row is None:
                raise NotFound(f"device {command.device_id} not found")
            sent = [("SENT", now)] if row["status"] == "SENT" else []
            return _command(row, [("QUEUED", now), *sent])

        result: Command = await self._run(op, retry=False)
        return result

    async def get_command(self, scope: Scope, command_id: UUID) -> Command:
        """One command with its transitions."""

        async def op(conn: Any) -> Command:
            row = await conn.fetchrow(GET, command_id, scope)
            if row is None:
                raise NotFound(f"command {command_id} not found")
            return _command(row, list(zip(row["t_status"], row["t_ts"], strict=True)))

        result: Command = await self._run(op)
        return result

    async def list_commands(
        self, scope: Scope, device_id: UUID, status: str | None, limit: int, offset: int
    ) -> Page[Command]:
        """A device's commands, newest first."""

        async def op(conn: Any) -> Page[Command]:
            async with one_snapshot(conn):
                await _check_device(conn, scope, device_id)
                where = "device_id = $1 AND ($2::text IS NULL OR status = $2)"
                total = await conn.fetchval(
                    f"SELECT count(*) FROM commands WHERE {where}", device_id, status
                )
                rows = await conn.fetch(
                    f"SELECT {COLS} FROM commands WHERE {where}"
                    " ORDER BY created_at DESC, id LIMIT $3 OFFSET $4",
                    device_id,
                    status,
                    limit,
                    offset,
                )
                return Page(await _with_transitions(conn, rows), total)

        result: Page[Command] = await self._run(op)
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
        """Conditional move with its transition row, in one statement."""

        async def op(conn: Any) -> Command | None:
            # One statement, atomic by itself; its transition arrays were read before the
            # new row, which is appended here.
            row = await conn.fetchrow(
                TRANSITION,
                command_id,
                list(allowed_from),
                to,
                now,
                deadline,
                response is not UNSET,
                None if response is UNSET else json.dumps(response),
                error,
                add_attempts,
                scope,
                device_id,
                only_if_next,
            )
            if row is None:
                return None
            history = [*zip(row["t_status"], row["t_ts"], strict=True), (to, now)]
            return _command(row, history)

        result: Command | None = await self._run(op, retry=False)
        return result

    async def claim_next_command(
        self, scope: Scope, device_id: UUID, now: int, *, only_if_next: bool = False
    ) -> Claimed | None:
        """The device's oldest unexpired QUEUED command, moved to SENT, in one statement."""

        async def op(conn: Any) -> Claimed | None:
            row = await conn.fetchrow(CLAIM, device_id, now, only_if_next, scope)
            if row is None:
                return None
            history = [*zip(row["t_status"], row["t_ts"], strict=True), ("SENT", now)]
            return Claimed(_command(row, history), row["more"])

        result: Claimed | None = await self._run(op, retry=False)
        return result

    async def answer_command(
        self, scope: Scope, command_id: UUID, device_id: UUID, response: Any, now: int
    ) -> Answered | None:
        """The device's answer to its open two-way command, in one statement."""

        async def op(conn: Any) -> Answered | None:
            row = await conn.fetchrow(
                ANSWER, command_id, device_id, now, json.dumps(response), scope
            )
            if row is None:
                return None
            delivered_now = row["was"] == "SENT"
            added = [("DELIVERED", now)] if delivered_now else []
            history = [*zip(row["t_status"], row["t_ts"], strict=True), *added]
            return Answered(_command(row, [*history, ("SUCCESSFUL", now)]), delivered_now)

        result: Answered | None = await self._run(op, retry=False)
        return result

    async def queued_commands(self, scope: Scope, device_id: UUID, limit: int) -> list[Command]:
        """A device's QUEUED commands in creation order."""

        async def op(conn: Any) -> list[Command]:
            rows = await conn.fetch(
                f"SELECT {COLS} FROM commands WHERE device_id = $1 AND status = 'QUEUED'"
                " AND ($2::uuid IS NULL OR tenant_id = $2) ORDER BY created_at, id LIMIT $3",
                device_id,
                scope,
                limit,
            )
            return [_command(r) for r in rows]

        result: list[Command] = await self._run(op)
        return result

    async def due_commands(self, scope: Scope, now: int, limit: int) -> list[Command]:
        """Open commands past their deadline or expiry."""

        async def op(conn: Any) -> list[Command]:
            rows = await conn.fetch(
                f"SELECT {COLS} FROM commands"
                " WHERE status IN ('QUEUED', 'SENT', 'DELIVERED', 'TIMEOUT')"
                " AND (deadline <= $1 OR expires_at <= $1)"
                " AND NOT (status = 'DELIVERED' AND oneway)"  # final for one-way commands
                " AND ($2::uuid IS NULL OR tenant_id = $2) ORDER BY created_at LIMIT $3",
                now,
                scope,
                limit,
            )
            return [_command(r) for r in rows]

        result: list[Command] = await self._run(op)
        return result

    async def command_in_flight(self, scope: Scope, device_id: UUID) -> Command | None:
        """The device's oldest command in flight, if any."""

        async def op(conn: Any) -> Command | None:
            row = await conn.fetchrow(
                f"SELECT {COLS} FROM commands c WHERE device_id = $1"
                " AND status IN ('SENT', 'DELIVERED', 'TIMEOUT')"
                f" AND {in_flight_sql('c')} AND ($2::uuid IS NULL OR tenant_id = $2)"
                " ORDER BY created_at, id LIMIT 1",
                device_id,
                scope,
            )
            return None if row is None else _command(row)

        result: Command | None = await self._run(op)
        return result

    async def queued_devices(self, scope: Scope, before: int, limit: int) -> list[UUID]:
        """Devices with a command QUEUED since before `before`."""

        async def op(conn: Any) -> list[UUID]:
            rows = await conn.fetch(
                "SELECT DISTINCT device_id FROM commands WHERE status = 'QUEUED'"
                " AND updated_at <= $1 AND ($2::uuid IS NULL OR tenant_id = $2) LIMIT $3",
                before,
                scope,
                limit,
            )
            return [r["device_id"] for r in rows]

        result: list[UUID] = await self._run(op)
        return result

    async def stale_sent_commands(self, scope: Scope, limit: int) -> list[Command]:
        """Persistent commands left SENT."""

        async def op(conn: Any) -> list[Command]:
            rows = await conn.fetch(
                f"SELECT {COLS} FROM commands WHERE status = 'SENT' AND persistent"
                " AND ($1::uuid IS NULL OR tenant_id = $1) ORDER BY created_at LIMIT $2",
                scope,
                limit,
            )
            return [_command(r) for r in rows]

        result: list[Command] = await self._run(op)
        return result

    async def get_attributes(
        self,
        scope: Scope,
        device_id: UUID,
        scopes: Sequence[str],
        keys: Sequence[str] | None,
    ) -> dict[str, dict[str, AttributeValue]]:
        """The device's attributes in these scopes."""

        async def op(conn: Any) -> dict[str, dict[str, AttributeValue]]:
            await _check_device(conn, scope, device_id)
            rows = await conn.fetch(
                "SELECT scope, key, value, ts FROM device_attributes"
                " WHERE device_id = $1 AND scope = ANY($2::text[])"
                " AND ($3::text[] IS NULL OR key = ANY($3::text[])) ORDER BY scope, key",
                device_id,
                list(scopes),
                None if keys is None else list(keys),
            )
            found: dict[str, dict[str, AttributeValue]] = {s: {} for s in scopes}
            for row in rows:
                found[row["scope"]][row["key"]] = AttributeValue(
                    json.loads(row["value"]), row["ts"]
                )
            return found

        result: dict[str, dict[str, AttributeValue]] = await self._run(op)
        return result

    async def set_attributes(
        self, scope: Scope, device_id: UUID, attr_scope: str, values: Mapping[str, Any], now: int
    ) -> None:
        """Merge attributes into a scope."""
        keys = list(values)
        texts = [json.dumps(values[k]) for k in keys]

        async def op(conn: Any) -> None:
            async with conn.transaction():
                await _check_device(conn, scope, device_id)
                await conn.execute(
                    "INSERT INTO device_attributes (device_id, scope, key, value, ts)"
                    " SELECT $1, $2, k, v, $5 FROM unnest($3::text[], $4::text[]) AS u(k, v)"
                    " ON CONFLICT (device_id, scope, key)"
                    " DO UPDATE SET value = EXCLUDED.value, ts = EXCLUDED.ts",
                    device_id,
                    attr_scope,
                    keys,
                    texts,
                    now,
                )

        await self._run(op)

    async def delete_attributes(
        self, scope: Scope, device_id: UUID, attr_scope: str, keys: Sequence[str]
    ) -> list[str]:
        """Delete keys from a scope; the keys that existed."""

        async def op(conn: Any) -> list[str]:
            async with conn.transaction():
                await _check_device(conn, scope, device_id)
                rows = await conn.fetch(
                    "DELETE FROM device_attributes WHERE device_id = $1 AND scope = $2"
                    " AND key = ANY($3::text[]) RETURNING key",
                    device_id,
                    attr_scope,
                    list(keys),
                )
            return sorted(r["key"] for r in rows)

        result: list[str] = await self._run(op)
        return result
