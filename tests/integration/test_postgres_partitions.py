"""Telemetry partitioned by week on PostgreSQL: made ahead, dropped whole by retention,
and an existing table converted with its rows (migration 0008)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from iiot.model import Device, DevicePoints, Point
from iiot.storage import TelemetryQuery
from iiot.storage._common import load_migrations, now_ms
from iiot.storage.postgres import PostgresStore
from iiot.storage.postgres_partitions import (
    AHEAD_WEEKS,
    BEHIND_WEEKS,
    WEEK_MS,
    ensure_partitions,
)

pytestmark = pytest.mark.asyncio

ALL_TIME = TelemetryQuery(start=0, end=2**62, limit=10_000)


async def _partitions(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'telemetry'::regclass"
        )
    finally:
        await conn.close()
    return {r["relname"] for r in rows}


async def _make_weeks(url: str, first_week: int, last_week: int) -> None:
    """Partitions for past weeks, as a platform running back then would have made them."""
    conn = await asyncpg.connect(url)

    async def run(op: Any) -> Any:
        return await op(conn)

    try:
        for week in range(first_week, last_week + 1):
            await ensure_partitions(run, now_ms=week * WEEK_MS)
    finally:
        await conn.close()


def _week_points(device: Device, week: int, count: int) -> DevicePoints:
    start = week * WEEK_MS
    step = WEEK_MS // count
    return DevicePoints(device, tuple(Point("t", start + i * step, float(i)) for i in range(count)))


async def test_partitions_are_made_ahead_and_points_land_in_them(pg_url: str) -> None:
    this_week = now_ms() // WEEK_MS
    async with PostgresStore(pg_url) as store:
        tenant = await store.create_tenant("acme")
        device = await store.create_device(tenant.id, "d", f"hash-{uuid.uuid4()}")
        await store.write_points([_week_points(device, this_week + 2, 10)])
        # A point from 1970 and one from the far future land in the default partition.
        await store.write_points(
            [DevicePoints(device, (Point("t", 5, 1.0), Point("t", 2**50, 2.0)))]
        )
        assert len((await store.query_telemetry(None, device.id, ALL_TIME))["t"]) == 12
    expected = {
        f"telemetry_w{w}" for w in range(this_week - BEHIND_WEEKS, this_week + AHEAD_WEEKS + 1)
    }
    assert expected | {"telemetry_default"} == await _partitions(pg_url)
    conn = await asyncpg.connect(pg_url)
    try:
        in_week = await conn.fetchval(f"SELECT count(*) FROM telemetry_w{this_week + 2}")
        in_default = await conn.fetchval("SELECT count(*) FROM telemetry_default")
    finally:
        await conn.close()
    assert (in_week, in_default) == (10, 2)


async def test_a_week_made_late_takes_its_points_from_the_default_partition(pg_url: str) -> None:
    week = now_ms() // WEEK_MS - 30
    async with PostgresStore(pg_url) as store:
        tenant = await store.create_tenant("acme")
        device = await store.create_device(tenant.id, "d", f"hash-{uuid.uuid4()}")
        await store.write_points([_week_points(device, week, 20)])
        await _make_weeks(pg_url, week, week)
        assert f"telemetry_w{week}" in await _partitions(pg_url)
        assert len((await store.query_telemetry(None, device.id, ALL_TIME))["t"]) == 20
        # Writing the same points again still merges instead of duplicating.
        await store.write_points([_week_points(device, week, 20)])
        assert len((await store.query_telemetry(None, device.id, ALL_TIME))["t"]) == 20


async def test_retention_drops_whole_weeks_of_one_tenant_and_deletes_shared_ones(
    pg_url: str,
) -> None:
    current = now_ms() // WEEK_MS
    first, shared, cutoff_week = current - 12, current - 9, current - 8
    async with PostgresStore(pg_url):
        pass  # the schema, before the past weeks are made
    await _make_weeks(pg_url, first, cutoff_week)
    async with PostgresStore(pg_url) as store:
        old = await store.create_tenant("old")
        other = await store.create_tenant("other")
        a = await store.create_device(old.id, "a", f"hash-{uuid.uuid4()}")
        b = await store.create_device(other.id, "b", f"hash-{uuid.uuid4()}")
        for week in range(first, cutoff_week + 1):
            await store.write_points([_week_points(a, week, 100)])
        await store.write_points([_week_points(b, shared, 50)])
        latest = await store.latest(None, a.id)

        removed = await store.delete_telemetry_before(old.id, cutoff_week * WEEK_MS)

        # Weeks holding only the tenant's points are gone whole; the week shared with
        # another tenant lost the tenant's rows only.
        left = await _partitions(pg_url)
        for week in range(first, shared):
            assert f"telemetry_w{week}" not in left
        assert {f"telemetry_w{shared}", f"telemetry_w{cutoff_week}"} <= left
        points = (await store.query_telemetry(None, a.id, ALL_TIME))["t"]
        assert len(points) == 100 and min(ts for ts, _ in points) == cutoff_week * WEEK_MS
        assert len((await store.query_telemetry(None, b.id, ALL_TIME))["t"]) == 50
        assert await store.latest(None, a.id) == latest
        assert removed >= 100  # the shared week's rows, counted exactly


async def test_an_existing_table_is_converted_with_its_rows(pg_url: str) -> None:
    # A database as the previous release left it: migrations up to 0003, with points.
    conn = await asyncpg.connect(pg_url)
    device_id, tenant_id = uuid.uuid4(), uuid.uuid4()
    future = (now_ms() // WEEK_MS + 3) * WEEK_MS
    try:
        await conn.execute(
            "CREATE TABLE schema_version (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at bigint NOT NULL)"
        )
        for migration in load_migrations("postgres"):
            if migration.version <= 3:
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_version VALUES ($1, $2, 0)",
                    migration.version,
                    migration.name,
                )
        await conn.execute("INSERT INTO tenants VALUES ($1, 'acme', 0, NULL)", tenant_id)
        await conn.execute(
            "INSERT INTO devices VALUES ($1, $2, 'd', 'active', 'h', 0)", device_id, tenant_id
        )
        await conn.execute(
            "INSERT INTO telemetry (device_id, key, ts, num_value)"
            " SELECT $1, 't', g, g FROM generate_series(1, 3000) AS g",
            device_id,
        )
        await conn.execute(
            "INSERT INTO telemetry (device_id, key, ts, int_value) VALUES ($1, 't', $2, 7)",
            device_id,
            future,
        )
        await conn.execute(
            "INSERT INTO telemetry_latest (device_id, key, ts, int_value) VALUES ($1, 't', $2, 7)",
            device_id,
            future,
        )
    finally:
        await conn.close()
    async with PostgresStore(pg_url) as store:
        points = (await store.query_telemetry(None, device_id, ALL_TIME))["t"]
        assert len(points) == 3001 and points[-1] == (future, 7)
        assert (await store.latest(None, device_id))["t"] == Point("t", future, 7)
        device = await store.get_device(None, device_id)
        await store.write_points([DevicePoints(device, (Point("t", 2, 9.5),))])
        assert (await store.query_telemetry(None, device_id, ALL_TIME))["t"][1] == (2, 9.5)
    left = await _partitions(pg_url)
    assert {"telemetry_legacy", "telemetry_default"} <= left
    # The future point moved to its own week once that week was made.
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM telemetry_legacy") == 3000
        assert await conn.fetchval(f"SELECT count(*) FROM telemetry_w{future // WEEK_MS}") == 1
    finally:
        await conn.close()


async def test_processes_starting_at_once_make_each_partition_once(pg_url: str) -> None:
    async with PostgresStore(pg_url):
        pass
    conn = await asyncpg.connect(pg_url)
    try:  # as if the platform had not run for weeks: the partitions are to be made again
        for name in await _partitions(pg_url):
            if name.startswith("telemetry_w"):
                await conn.execute(f"DROP TABLE {name}")
    finally:
        await conn.close()
    stores = [PostgresStore(pg_url) for _ in range(4)]
    await asyncio.gather(*(s.__aenter__() for s in stores))
    try:
        this_week = now_ms() // WEEK_MS
        expected = {f"telemetry_w{w}" for w in range(this_week - BEHIND_WEEKS, this_week + 5)}
        assert expected <= await _partitions(pg_url)
    finally:
        await asyncio.gather(*(s.__aexit__(None, None, None) for s in stores))


async def test_reads_over_many_partitions_are_never_jit_compiled(pg_url: str) -> None:
    # JIT compiling a short lookup over many partitions cost 8-33 ms of a 0.2 ms query.
    async with PostgresStore(pg_url, read_url=pg_url) as store:

        async def jit(conn: Any) -> str:
            return str(await conn.fetchval("SHOW jit"))

        assert await store._run(jit) == "off"
        assert await store._run(jit, read=True) == "off"
