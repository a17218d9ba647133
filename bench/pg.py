"""The benchmarks' PostgreSQL: which server, and throwaway databases on it."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg

__all__ = ["ADMIN_URL", "temporary_database"]

ADMIN_URL = os.environ.get(
    "IIOT_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@asynccontextmanager
async def temporary_database(prefix: str = "iiot_bench") -> AsyncIterator[str]:
    """A new empty database on the benchmark server (its URL), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield urlunsplit(urlsplit(ADMIN_URL)._replace(path="/" + name))
    finally:
        admin = await asyncpg.connect(ADMIN_URL)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
