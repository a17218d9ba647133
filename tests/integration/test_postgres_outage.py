"""PostgreSQL going away and coming back, on a private cluster: clean errors, self-healing."""

from __future__ import annotations

import asyncio
from uuid import UUID

import pytest

from iiot.errors import StorageUnavailable
from iiot.model import Device, DevicePoints, Point
from iiot.storage import TelemetryQuery
from iiot.storage.postgres import PostgresStore
from tests.pgcluster import PgCluster, pg_cluster

__all__ = ["pg_cluster"]  # the fixture, imported for the tests below

ALL_TIME = TelemetryQuery(start=0, end=2**62, limit=100_000)


def points(device: Device, start: int, count: int) -> list[DevicePoints]:
    """`count` points of key `t` from ts `start`, value = ts."""
    return [
        DevicePoints(device, tuple(Point("t", ts, float(ts)) for ts in range(start, start + count)))
    ]


async def stored(store: PostgresStore, device_id: UUID) -> list[tuple[int, object]]:
    return (await store.query_telemetry(None, device_id, ALL_TIME)).get("t", [])


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_writes_fail_cleanly_while_the_server_is_down_and_recover_by_themselves(
    pg_cluster: PgCluster, mode: str
) -> None:
    async with PostgresStore(pg_cluster.url(), min_size=2, connect_timeout=2) as store:
        tenant = await store.create_tenant("acme")
        device = await store.create_device(tenant.id, "pump", "hash")
        await store.write_points(points(device, 1, 100))

        pg_cluster.stop(mode)  # "immediate" is what a crash or a power cut looks like
        for _ in range(3):  # the pipeline retries: every attempt fails the same clean way
            with pytest.raises(StorageUnavailable, match="unavailable"):
                await store.write_points(points(device, 101, 100))
        with pytest.raises(StorageUnavailable):
            await store.ping()
        with pytest.raises(StorageUnavailable):
            await store.latest(None, device.id)

        pg_cluster.start()
        # The same store, never restarted: the next attempt goes through.
        await store.write_points(points(device, 101, 100))
        await store.ping()
        # A retry of a batch that did commit changes nothing.
        await store.write_points(points(device, 101, 100))
        await store.write_points(points(device, 1, 100))

        rows = await stored(store, device.id)
        assert rows == [(ts, float(ts)) for ts in range(1, 201)]
        assert (await store.latest(None, device.id))["t"] == Point("t", 200, 200.0)


async def test_killed_connections_are_replaced_without_losing_or_doubling_points(
    pg_cluster: PgCluster,
) -> None:
    async with PostgresStore(pg_cluster.url(), min_size=3, connect_timeout=2) as store:
        tenant = await store.create_tenant("acme")
        device = await store.create_device(tenant.id, "pump", "hash")
        # Fill the pool with several open connections.
        await asyncio.gather(*(store.write_points(points(device, i * 10, 10)) for i in range(6)))
        assert pg_cluster.terminate_connections() >= 1

        # Every pooled connection is dead now; the store answers as if nothing happened.
        await store.write_points(points(device, 60, 40))
        assert pg_cluster.terminate_connections() >= 1
        assert len((await store.query_telemetry(None, device.id, ALL_TIME))["t"]) == 100
        assert pg_cluster.terminate_connections() >= 1
        await asyncio.gather(*(store.write_points(points(device, i * 10, 10)) for i in range(10)))

        assert await stored(store, device.id) == [(ts, float(ts)) for ts in range(100)]


async def test_a_store_cannot_start_without_its_server(pg_cluster: PgCluster) -> None:
    pg_cluster.stop()
    with pytest.raises(StorageUnavailable, match="cannot connect to PostgreSQL"):
        async with PostgresStore(pg_cluster.url(), connect_timeout=2):
            pass
    pg_cluster.start()
    async with PostgresStore(pg_cluster.url(), connect_timeout=2) as store:
        await store.ping()
        assert (await store.list_tenants(None, 10, 0)).total == 0
