"""PostgreSQL connections: the errors that mean "unavailable", and resetting pooled ones."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import asyncpg

# Session settings of every pooled connection. JIT off: the platform's statements are short
# index lookups, but over many partitions (and with statistics not yet caught up after a
# burst of writes) their estimated cost passes `jit_above_cost`, and compiling them took
# 8-33 ms of a query that runs in 0.2 ms: the read mix fell to 1-2 % of its rate.
SERVER_SETTINGS = {"jit": "off"}

# Errors that mean "the server cannot be reached or the connection broke": the operation
# did not complete and may be retried later.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # asyncpg raises this for a pooled connection whose backend was terminated while idle
    # (MagicStack/asyncpg#784, #1069): a dead connection like any other.
    asyncpg.exceptions.InternalClientError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, crash shutdown
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    OSError,
    TimeoutError,
)
# A pooled connection that died while idle (server restart, pg_terminate_backend) or a
# transaction that lost a deadlock: retrying an idempotent operation once at once hides it.
_RETRY_ONCE: tuple[type[BaseException], ...] = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)
# Transient conflicts between transactions: after the retry they count as "unavailable".
_TRANSIENT = (*_UNAVAILABLE, *_RETRY_ONCE)


async def _reset_connection(conn: Any) -> None:
    """Make a connection fit for the next caller when it goes back to the pool.

    asyncpg's default reset runs `pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL` on every release: one more round trip per call, for session features this store
    never uses (its advisory lock is transaction-scoped). Only an open transaction, which
    an interrupted call may leave behind, needs undoing.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def _describe(url: str) -> str:
    """host:port/db of a URL, without the password, for messages."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"


def one_snapshot(conn: Any) -> Any:
    """A read-only transaction whose statements all read the same committed data: a page's
    rows and its total, counted by a second statement, must agree with each other (under
    READ COMMITTED a row committed between the two made "total 1, items 2")."""
    return conn.transaction(isolation="repeatable_read", readonly=True)


async def scoped_page(
    conn: Any, table: str, columns: str, scope_column: str, order: str, scope: Any, page: Any
) -> tuple[list[Any], int]:
    """One page of `table`'s rows visible in the scope (`scope_column` = scope, or all with
    no scope) and their total, counted and read in `one_snapshot`. `page`: (limit, offset)."""
    limit, offset = page
    async with one_snapshot(conn):
        where = f"WHERE ($1::uuid IS NULL OR {scope_column} = $1)"
        total = await conn.fetchval(f"SELECT count(*) FROM {table} {where}", scope)
        rows = await conn.fetch(
            f"SELECT {columns} FROM {table} {where} ORDER BY {order} LIMIT $2 OFFSET $3",
            scope,
            limit,
            offset,
        )
    return list(rows), int(total)
