"""A page's rows and its total agree even while rows are being added: both stores count and
read them in one snapshot (under PostgreSQL's READ COMMITTED, or on SQLite's autocommit
reader connection, a row committed between the two statements gave "total 1, items 2")."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from iiot.storage import open_store


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'iiot.db'}"
    return str(request.getfixturevalue("pg_url"))


async def test_page_total_never_disagrees_with_its_rows_while_rows_are_added(
    db_url: str,
) -> None:
    async with open_store(db_url) as store:
        adding = True

        async def add() -> None:
            index = 0
            while adding:
                await store.create_tenant(f"t-{index:05d}")
                index += 1

        writer = asyncio.create_task(add())
        try:
            for _ in range(300):
                page = await store.list_tenants(None, 10_000, 0)
                assert page.total == len(page.items), (page.total, len(page.items))
        finally:
            adding = False
            await writer
        assert (await store.list_tenants(None, 10_000, 0)).total > 0
