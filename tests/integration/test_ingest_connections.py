"""Telemetry commits have PostgreSQL connections of their own: a batch commits while every
connection of the store's statement pool is busy (as when a hundred command and API
statements wait for one), instead of queueing behind them."""

from __future__ import annotations

import asyncio
from typing import Any

from iiot.model import DevicePoints, Point
from iiot.storage.postgres import PostgresStore


async def test_a_batch_commits_while_the_statement_pool_is_busy(pg_url: str) -> None:
    async with PostgresStore(pg_url, max_size=1) as store:
        tenant = await store.create_tenant("acme")
        device = await store.create_device(tenant.id, "press-1", "hash-1")
        busy = asyncio.Event()

        async def hold(conn: Any) -> None:
            busy.set()
            await conn.execute("SELECT pg_sleep(5)")

        holder = asyncio.create_task(store._run(hold))  # the statement pool's one connection
        await busy.wait()
        batch = [DevicePoints(device, (Point("t", 1_767_225_600_000, 21.5),))]
        async with asyncio.timeout(2):  # well before the other statement ends
            await store.write_points(batch)
        assert not holder.done()
        await holder
        found = await store.latest(tenant.id, device.id)
        assert found["t"].value == 21.5
