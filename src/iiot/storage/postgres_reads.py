"""The read path on PostgreSQL: a pool of its own for queries, bounded by a statement timeout.

Queries (telemetry ranges, latest values, lists) never wait for a connection that a writer
holds, and a query that runs too long is cancelled by the server instead of holding a
connection and the CPU. With `IIOT_DATABASE_READ_URL` the pool connects to a read
replica; otherwise to the primary.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from iiot.errors import StorageUnavailable
from iiot.storage.postgres_pool import (
    _UNAVAILABLE,
    SERVER_SETTINGS,
    _describe,
    _reset_connection,
)

__all__ = ["DEFAULT_QUERY_TIMEOUT_S", "open_read_pool", "query_too_long"]

DEFAULT_QUERY_TIMEOUT_S = 30.0


async def open_read_pool(
    url: str, *, max_size: int, timeout_s: float, connect_timeout: float
) -> Any:
    """A pool for queries: read-only transactions, each statement cancelled after `timeout_s`."""
    try:
        return await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=max_size,
            timeout=connect_timeout,
            reset=_reset_connection,
            max_inactive_connection_lifetime=300.0,
            server_settings={
                **SERVER_SETTINGS,
                "statement_timeout": str(max(1, int(timeout_s * 1000))),
                # A query can never change data, even by mistake (and a replica refuses anyway).
                "default_transaction_read_only": "on",
            },
        )
    except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
        raise StorageUnavailable(
            f"cannot connect to PostgreSQL for queries at {_describe(url)}: {exc}"
        ) from exc


def query_too_long(timeout_s: float) -> StorageUnavailable:
    """The error for a query the server cancelled at the statement timeout."""
    return StorageUnavailable(
        f"the query ran longer than {timeout_s:g} s and was cancelled: ask for a shorter range,"
        " fewer keys or an aggregate (agg with interval)"
    )
