"""PostgreSQL specifics of the write path: latest values refreshed after commit, devices
remembered between batches. Behaviour both stores share is in the contract suite."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from iiot.backup import backup, restore
from iiot.model import Device, DevicePoints, Point, Scalar
from iiot.storage import open_store
from iiot.storage.postgres import PostgresStore

pytestmark = pytest.mark.asyncio


def batch(device: Device, ts: int, **values: Scalar) -> list[DevicePoints]:
    return [DevicePoints(device, tuple(Point(k, ts, v) for k, v in values.items()))]


async def table_latest(url: str, device_id: uuid.UUID) -> dict[str, tuple[int, Any]]:
    """What telemetry_latest itself holds for a device: key -> (ts, num_value)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT key, ts, num_value FROM telemetry_latest WHERE device_id = $1", device_id
        )
    finally:
        await conn.close()
    return {r["key"]: (r["ts"], r["num_value"]) for r in rows}


async def test_reads_are_current_while_the_latest_table_lags(pg_url: str) -> None:
    async with PostgresStore(pg_url) as store:
        # The background refresh runs when it will (right after a first commit, then at most
        # once a second), so on a busy machine it could land anywhere in this test; stopped
        # here, the table lags for sure until the store closes, which refreshes it.
        await store._latest.close()
        tenant = await store.create_tenant("acme")
        press = await store.create_device(tenant.id, "press-1", "hash-1")
        await store.write_points(batch(press, 1000, temperature=20.0, pressure=1.0))
        # A new series gets its row with the points themselves.
        assert await table_latest(pg_url, press.id) == {
            "temperature": (1000, 20.0),
            "pressure": (1000, 1.0),
        }
        await store.write_points(batch(press, 2000, temperature=21.5))
        await store.write_points(batch(press, 1500, temperature=99.0))  # late: never latest
        # Not refreshed yet: the table still shows the first point.
        assert (await table_latest(pg_url, press.id))["temperature"] == (1000, 20.0)
        latest = await store.latest(None, press.id)
        assert latest["temperature"] == Point("temperature", 2000, 21.5)
        assert latest["pressure"] == Point("pressure", 1000, 1.0)
        # The same ts again replaces the value (a device correcting a reading).
        await store.write_points(batch(press, 2000, temperature=22.0))
        assert (await store.latest(None, press.id))["temperature"].value == 22.0
    # Closed: the last refresh brought the table up to date.
    assert (await table_latest(pg_url, press.id))["temperature"] == (2000, 22.0)


CRASH_AFTER_COMMIT = textwrap.dedent(
    """
    import asyncio, os, sys, uuid
    from iiot.model import Device, DevicePoints, Point
    from iiot.storage.postgres import PostgresStore

    async def main() -> None:
        store = PostgresStore(sys.argv[1])
        await store.__aenter__()
        device = Device(uuid.UUID(sys.argv[2]), uuid.UUID(sys.argv[3]), "press-1", "active")
        for ts in (1000, 2000, 3000):
            await store.write_points([DevicePoints(device, (Point("t", ts, ts / 100),))])
        os._exit(0)  # committed, and gone before any refresh of the latest values

    asyncio.run(main())
    """
)


async def test_a_crash_before_the_refresh_changes_nothing_readers_see(
    pg_url: str, tmp_path: Path
) -> None:
    async with PostgresStore(pg_url) as store:
        tenant = await store.create_tenant("acme")
        press = await store.create_device(tenant.id, "press-1", "hash-1")
    await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", CRASH_AFTER_COMMIT, pg_url, str(press.id), str(tenant.id)],
        check=True,
        timeout=60,
    )
    assert (await table_latest(pg_url, press.id))["t"][0] < 3000, "the crash came too late"
    async with PostgresStore(pg_url) as store:
        assert (await store.latest(None, press.id))["t"] == Point("t", 3000, 30.0)
    # A backup holds the values readers see, so a restore into SQLite agrees.
    archive = tmp_path / "backup.tar"
    await backup(pg_url, archive)
    sqlite_url = f"sqlite:///{tmp_path / 'restored.db'}"
    await restore(sqlite_url, archive)
    async with open_store(sqlite_url) as restored:
        assert (await restored.latest(None, press.id))["t"] == Point("t", 3000, 30.0)


async def test_a_device_deleted_by_another_process_gets_no_more_points(pg_url: str) -> None:
    async with PostgresStore(pg_url) as writer, PostgresStore(pg_url) as admin:
        tenant = await writer.create_tenant("acme")
        gone = await writer.create_device(tenant.id, "press-1", "hash-1")
        kept = await writer.create_device(tenant.id, "press-2", "hash-2")
        await writer.write_points(batch(gone, 1000, t=1.0) + batch(kept, 1000, t=1.0))
        # The writer now remembers both devices; the other process deletes one.
        await admin.delete_device(None, gone.id)
        await writer.write_points(batch(gone, 2000, t=2.0) + batch(kept, 2000, t=2.0))
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT device_id, ts FROM telemetry ORDER BY device_id, ts")
        latest = await conn.fetch("SELECT device_id, ts FROM telemetry_latest")
    finally:
        await conn.close()
    assert [(r["device_id"], r["ts"]) for r in rows] == [(kept.id, 1000), (kept.id, 2000)]
    assert [(r["device_id"], r["ts"]) for r in latest] == [(kept.id, 2000)]


async def test_after_a_deletion_elsewhere_a_batch_registers_its_series_again(pg_url: str) -> None:
    """A forced restore (or any deletion) may remove rows this writer thinks exist."""
    async with PostgresStore(pg_url) as writer, PostgresStore(pg_url) as admin:
        tenant = await writer.create_tenant("acme")
        press = await writer.create_device(tenant.id, "press-1", "hash-1")
        other = await writer.create_device(tenant.id, "press-2", "hash-2")
        await writer.write_points(batch(press, 1000, t=1.0, p=2.0))
        # The rows vanish behind the writer's back (as a restore of an older backup would
        # do), and a deletion tells writers to look again.
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute("DELETE FROM telemetry_latest WHERE device_id = $1", press.id)
        finally:
            await conn.close()
        await admin.delete_device(None, other.id)
        await writer.write_points(batch(press, 2000, t=3.0, p=4.0))
        assert await table_latest(pg_url, press.id) == {"t": (2000, 3.0), "p": (2000, 4.0)}
        latest = await writer.latest(None, press.id)
        assert set(latest) == {"t", "p"}
