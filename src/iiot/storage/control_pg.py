"""`ControlStore` on PostgreSQL: commands, their transitions and attributes (migration 0006).

Every state change is one statement: a conditional UPDATE (`WHERE status = ANY(allowed)`)
and the INSERT of its transition row in the same CTE, so a state never goes backwards and
two processes racing for one command cannot both win.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from uuid import UUID, uuid4

from iiot.errors import NotFound
from iiot.storage.base import Page, Scope
from iiot.storage.control import UNSET, AttributeValue, Command, NewCommand, in_flight_sql
from iiot.storage.postgres_pool import one_snapshot

__all__ = ["PgControlStore"]

T = TypeVar("T")
Runner = Callable[..., Awaitable[Any]]

_COLS = (
    "id, tenant_id, device_id, method, params, oneway, persistent, timeout_ms, expires_at,"
    " retries, attempts, status, response, error, sent_by, deadline, created_at, updated_at"
)
_TRANSITION = f"""
WITH u AS (
    UPDATE commands SET status = $3, updated_at = $4, deadline = $5,
        response = CASE WHEN $6 THEN $7 ELSE response END,
        error = coalesce($8, error),
        attempts = attempts + $9
    WHERE id = $1 AND status = ANY($2::text[])
      AND ($10::uuid IS NULL OR tenant_id = $10) AND ($11::uuid IS NULL OR device_id = $11)
      AND NOT (oneway AND $3 = 'SUCCESSFUL')  -- a one-way command has no answer
      -- only_if_next: only the device's oldest QUEUED command, with none in flight. Of two
      -- racing claims the newer one's snapshot sees the older QUEUED (not committed yet) or
      -- SENT, so it is refused: no lock is needed.
      AND (NOT $12 OR NOT EXISTS (
          SELECT 1 FROM commands o WHERE o.device_id = commands.device_id AND o.id <> commands.id
            AND ((o.status IN ('SENT', 'DELIVERED', 'TIMEOUT') AND {in_flight_sql("o")})
              OR (o.status = 'QUEUED'
                  AND (o.created_at, o.id) < (commands.created_at, commands.id)))))
    RETURNING {_COLS}
), t AS (
    INSERT INTO command_transitions (command_id, status, ts) SELECT id, status, updated_at FROM u
)
SELECT u.*,
    ARRAY(SELECT status FROM command_transitions WHERE command_id = u.id ORDER BY seq) AS t_status,
    ARRAY(SELECT ts FROM command_transitions WHERE command_id = u.id ORDER BY seq) AS t_ts
FROM u
"""
_GET = f"""
SELECT {_COLS},
    ARRAY(SELECT status FROM command_transitions WHERE command_id = $1 ORDER BY seq) AS t_status,
    ARRAY(SELECT ts FROM command_transitions WHERE command_id = $1 ORDER BY seq) AS t_ts
FROM commands WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)
"""
# One statement: the device's scope check, the command and its first transition.
_CREATE = f"""
WITH d AS (
    SELECT id FROM devices WHERE id = $3 AND ($13::uuid IS NULL OR tenant_id = $13)
), c AS (
    INSERT INTO commands ({_COLS})
    SELECT $1, $2, d.id, $4, $5, $6, $7, $8, $9, $10, 0, 'QUEUED', NULL, NULL, $11, NULL, $12, $12
    FROM d
    RETURNING {_COLS}
), t AS (
    INSERT INTO command_transitions (command_id, status, ts) SELECT id, 'QUEUED', $12 FROM c
)
SELECT * FROM c
"""


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

    async def create_command(self, scope: Scope, command: NewCommand, now: int) -> Command:
        """Store a QUEUED command with its first transition."""

        async def op(conn: Any) -> Command:
            row = await conn.fetchrow(
                _CREATE,
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
            )
            if row is None:
                raise NotFound(f"device {command.device_id} not found")
            return _command(row, [("QUEUED", now)])

        result: Command = await self._run(op, retry=False)
        return result

    async def get_command(self, scope: Scope, command_id: UUID) -> Command:
        """One command with its transitions."""

        async def op(conn: Any) -> Command:
            row = await conn.fetchrow(_GET, command_id, scope)
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
                    f"SELECT {_COLS} FROM commands WHERE {where}"
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
                _TRANSITION,
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

    async def queued_commands(self, scope: Scope, device_id: UUID, limit: int) -> list[Command]:
        """A device's QUEUED commands in creation order."""

        async def op(conn: Any) -> list[Command]:
            rows = await conn.fetch(
                f"SELECT {_COLS} FROM commands WHERE device_id = $1 AND status = 'QUEUED'"
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
                f"SELECT {_COLS} FROM commands"
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
                f"SELECT {_COLS} FROM commands c WHERE device_id = $1"
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
                f"SELECT {_COLS} FROM commands WHERE status = 'SENT' AND persistent"
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
