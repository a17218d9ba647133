"""Heavy reads and large deletions must not stop ingestion (both stores, real databases).

Each test holds one side busy with a real lock taken from outside the store, the way an
operator's session or a slow statement would, and checks that the other side still gets
through. A timeout here only detects a hang; nothing measures speed.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from iiot.errors import InvalidRequest, NotFound, StorageUnavailable
from iiot.model import Device, DevicePoints, Point
from iiot.storage import Store, TelemetryQuery, open_store
from iiot.storage.postgres import PostgresStore
from iiot.storage.sqlite import SqliteStore

pytestmark = pytest.mark.asyncio

ALL_TIME = TelemetryQuery(start=0, end=2**62, limit=10)
HANG_S = 15.0  # far beyond any honest answer: only a blocked call takes this long


def _points(device: Device, key: str, count: int, first_ts: int = 1) -> list[DevicePoints]:
    return [
        DevicePoints(device, tuple(Point(key, ts, float(ts)) for ts in range(i, i + 5000)))
        for i in range(first_ts, first_ts + count, 5000)
    ]


async def _device(store: Store, tenant_id: uuid.UUID, name: str) -> Device:
    return await store.create_device(tenant_id, name, f"hash-{uuid.uuid4()}")


async def _waiting_on_lock(url: str) -> None:
    """Wait until some backend of this database waits for a lock (bounded)."""
    conn = await asyncpg.connect(url)
    try:
        async with asyncio.timeout(HANG_S):
            waiting = 0
            while not waiting:
                await asyncio.sleep(0.05)
                waiting = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
    finally:
        await conn.close()


@pytest.fixture
async def pg_store(pg_url: str) -> AsyncIterator[PostgresStore]:
    async with PostgresStore(pg_url, max_size=2) as store:
        yield store


# --- deletions (issue: deleting a large device or tenant stops all writers) --------------


@pytest.mark.parametrize("what", ["device", "tenant"])
async def test_pg_purging_a_deleted_device_does_not_hold_up_writers(
    pg_url: str, pg_store: PostgresStore, what: str
) -> None:
    store = pg_store
    doomed_tenant = await store.create_tenant("doomed")
    other_tenant = await store.create_tenant("other")
    doomed = await _device(store, doomed_tenant.id, "big")
    other = await _device(store, other_tenant.id, "busy")
    for part in _points(doomed, "t", 20_000):
        await store.write_points([part])
    # Someone else holds one of the doomed device's rows: its purge has to wait for it.
    blocker = await asyncpg.connect(pg_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(
            "SELECT 1 FROM telemetry WHERE device_id = $1 AND key = 't' AND ts = 19999 FOR UPDATE",
            doomed.id,
        )
        if what == "device":
            deletion = asyncio.create_task(store.delete_device(None, doomed.id))
        else:
            deletion = asyncio.create_task(store.delete_tenant(None, doomed_tenant.id))
        await _waiting_on_lock(pg_url)
        # While the deletion waits, the other tenant's device still gets its points in.
        await asyncio.wait_for(store.write_points(_points(other, "t", 5000)), HANG_S)
        assert not deletion.done()
        with pytest.raises(NotFound):
            await store.get_device(None, doomed.id)
        await tx.rollback()
        await asyncio.wait_for(deletion, HANG_S)
    finally:
        await blocker.close()
    conn = await asyncpg.connect(pg_url)
    try:
        left = await conn.fetchval("SELECT count(*) FROM telemetry WHERE device_id = $1", doomed.id)
        kept = await conn.fetchval("SELECT count(*) FROM telemetry WHERE device_id = $1", other.id)
    finally:
        await conn.close()
    assert (left, kept) == (0, 5000)


@pytest.mark.parametrize("what", ["device", "tenant"])
async def test_sqlite_purging_a_deleted_device_lets_writers_in_between(
    tmp_path: Path, what: str
) -> None:
    async with SqliteStore(tmp_path / "iiot.db") as store:
        doomed_tenant = await store.create_tenant("doomed")
        other_tenant = await store.create_tenant("other")
        doomed = await _device(store, doomed_tenant.id, "big")
        other = await _device(store, other_tenant.id, "busy")
        for part in _points(doomed, "t", 100_000):
            await store.write_points([part])
        if what == "device":
            deletion = asyncio.create_task(store.delete_device(None, doomed.id))
        else:
            deletion = asyncio.create_task(store.delete_tenant(None, doomed_tenant.id))
        # The device is gone for everybody at once...
        async with asyncio.timeout(HANG_S):
            while True:
                try:
                    await store.get_device(None, doomed.id)
                except NotFound:
                    break
        # ...and a batch of another device commits while its points are still being purged.
        await store.write_points(_points(other, "t", 10))
        assert not deletion.done()
        await asyncio.wait_for(deletion, HANG_S)
        assert await store.query_telemetry(None, other.id, ALL_TIME) != {}
    with sqlite3.connect(tmp_path / "iiot.db") as conn:
        rows = conn.execute(
            "SELECT count(*) FROM telemetry WHERE device_id = ?", (doomed.id.bytes,)
        ).fetchone()[0]
    assert rows == 0


async def test_a_purge_cut_short_is_finished_on_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "iiot.db"
    async with SqliteStore(path) as store:
        tenant = await store.create_tenant("acme")
        device = await _device(store, tenant.id, "big")
        for part in _points(device, "t", 20_000):
            await store.write_points([part])
        deletion = asyncio.create_task(store.delete_device(None, device.id))
        async with asyncio.timeout(HANG_S):
            while True:
                try:
                    await store.get_device(None, device.id)
                except NotFound:
                    break
        deletion.cancel()  # the process stops in the middle of the purge
        with pytest.raises(asyncio.CancelledError):
            await deletion
    async with SqliteStore(path) as store:
        await store.wait_for_purges()
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]
    assert rows == 0


# --- reads (issue: heavy reads starve ingestion) -----------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'iiot.db'}"
    return str(request.getfixturevalue("pg_url"))


async def test_a_response_is_capped_in_points_with_a_hint_to_page(db_url: str) -> None:
    async with open_store(db_url) as store:
        tenant = await store.create_tenant("acme")
        device = await _device(store, tenant.id, "d")
        await store.write_points(
            [DevicePoints(device, tuple(Point(k, 1, 1.0) for k in ("a", "b", "c")))]
        )
        # Without keys, every key of the device counts: 3 keys x 10 points > 20.
        capped = TelemetryQuery(start=0, end=100, limit=10, max_points=20)
        with pytest.raises(InvalidRequest, match="at most 20 points") as info:
            await store.query_telemetry(None, device.id, capped)
        assert "limit" in str(info.value) and "start" in str(info.value)
        with pytest.raises(InvalidRequest, match="at most 20 points"):
            three = TelemetryQuery(0, 100, keys=("a", "b", "c"), limit=7, max_points=20)
            await store.query_telemetry(None, device.id, three)
        # Within the cap, or asking for fewer keys, the answer comes.
        fewer = TelemetryQuery(start=0, end=100, keys=("a", "b"), limit=10, max_points=20)
        assert set(await store.query_telemetry(None, device.id, fewer)) == {"a", "b"}
        enough = TelemetryQuery(start=0, end=100, limit=6, max_points=20)
        assert set(await store.query_telemetry(None, device.id, enough)) == {"a", "b", "c"}
        # Aggregates count buckets: 3 keys x 2 buckets fit even with a large limit.
        agg = TelemetryQuery(0, 100, limit=1000, agg="count", interval_ms=50, max_points=20)
        assert set(await store.query_telemetry(None, device.id, agg)) == {"a", "b", "c"}
        # Another tenant's device still answers 404, not a cap error.
        with pytest.raises(NotFound):
            await store.query_telemetry(uuid.uuid4(), device.id, capped)


async def test_pg_reads_have_their_own_connections(pg_url: str, pg_store: PostgresStore) -> None:
    store = pg_store
    tenant = await store.create_tenant("acme")
    device = await _device(store, tenant.id, "d")
    await store.write_points(_points(device, "t", 10))
    # Writers wait for a device deletion that holds the devices lock: both of the
    # writers' connections (max_size=2) are taken by blocked batches.
    holder = await asyncpg.connect(pg_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", 0x1107_DE71)
        writes = [
            asyncio.create_task(store.write_points(_points(device, "t", 5, first_ts=ts)))
            for ts in (100, 200, 300)
        ]
        await _waiting_on_lock(pg_url)
        answer = await asyncio.wait_for(store.query_telemetry(None, device.id, ALL_TIME), HANG_S)
        assert len(answer["t"]) == 10
        assert "t" in await asyncio.wait_for(store.latest(None, device.id), HANG_S)
        page = await asyncio.wait_for(store.list_devices(None, 10, 0), HANG_S)
        assert page.total == 1
        await holder.execute("SELECT pg_advisory_unlock($1)", 0x1107_DE71)
        await asyncio.wait_for(asyncio.gather(*writes), HANG_S)
    finally:
        await holder.close()


async def test_pg_a_read_past_the_statement_timeout_is_a_clear_503(pg_url: str) -> None:
    async with PostgresStore(pg_url, query_timeout_s=0.5) as store:
        tenant = await store.create_tenant("acme")
        device = await _device(store, tenant.id, "d")
        await store.write_points(_points(device, "t", 10))
        holder = await asyncpg.connect(pg_url)
        try:
            async with holder.transaction():
                # A statement stuck this long is cancelled by the server.
                await holder.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")
                with pytest.raises(StorageUnavailable, match=r"longer than 0\.5 s") as info:
                    await asyncio.wait_for(store.query_telemetry(None, device.id, ALL_TIME), HANG_S)
                assert "shorter range" in str(info.value)
        finally:
            await holder.close()
        # The store keeps answering afterwards.
        assert len((await store.query_telemetry(None, device.id, ALL_TIME))["t"]) == 10


async def test_sqlite_reads_do_not_wait_for_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "iiot.db"
    async with SqliteStore(path, busy_timeout=60.0) as store:
        tenant = await store.create_tenant("acme")
        device = await _device(store, tenant.id, "d")
        await store.write_points(_points(device, "t", 10))
        # Another process holds the write lock: the store's writer waits for it...
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            write = asyncio.create_task(store.write_points(_points(device, "t", 5, 100)))
            await asyncio.sleep(0.2)
            assert not write.done()
            # ...while reads are answered from a snapshot.
            answer = await asyncio.wait_for(
                store.query_telemetry(None, device.id, ALL_TIME), HANG_S
            )
            assert len(answer["t"]) == 10
            assert "t" in await asyncio.wait_for(store.latest(None, device.id), HANG_S)
            other.execute("COMMIT")
        finally:
            other.close()
        await asyncio.wait_for(write, HANG_S)
        assert len((await store.query_telemetry(None, device.id, ALL_TIME))["t"]) == 10
