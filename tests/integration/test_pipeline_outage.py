"""The pipeline over PostgreSQL while the database is cut and stopped: every accepted point
is stored exactly once after recovery, and writing resumes by itself (private cluster)."""

from __future__ import annotations

import asyncio

from iiot.bus import LiveBus
from iiot.metrics import Metrics
from iiot.model import DevicePoints, Point
from iiot.pipeline import Pipeline, PipelineSettings
from iiot.storage import TelemetryQuery
from iiot.storage.postgres import PostgresStore
from tests.pgcluster import PgCluster, pg_cluster

__all__ = ["pg_cluster"]

MESSAGES_PER_SENDER = 150
SENDERS = 8


async def test_points_accepted_around_an_outage_are_stored_exactly_once(
    pg_cluster: PgCluster,
) -> None:
    settings = PipelineSettings(max_batch_points=200, max_delay_s=0.02, commit_timeout_s=120)
    async with PostgresStore(pg_cluster.url(), connect_timeout=2) as store:
        tenant = await store.create_tenant("acme")
        devices = [await store.create_device(tenant.id, f"d{i}", f"h{i}") for i in range(SENDERS)]
        async with Pipeline(store, LiveBus(), Metrics(), settings) as pipeline:
            acknowledged = 0
            progress = asyncio.Event()

            async def sender(index: int) -> None:
                nonlocal acknowledged
                device = devices[index]
                for n in range(MESSAGES_PER_SENDER):
                    item = DevicePoints(device, (Point("a", n, n), Point("b", n, float(n))))
                    await pipeline.submit(item, "test")
                    acknowledged += 1
                    if acknowledged == SENDERS * 20:
                        progress.set()
                    await asyncio.sleep(0.002)

            senders = [asyncio.create_task(sender(i)) for i in range(SENDERS)]
            await asyncio.wait_for(progress.wait(), 60)
            # First a cut: every connection killed mid-stream.
            await asyncio.to_thread(pg_cluster.terminate_connections)
            await asyncio.sleep(0.3)
            # Then a crash: the server gone for a while, as on a power cut.
            await asyncio.to_thread(pg_cluster.stop, "immediate")
            await asyncio.sleep(2)
            assert not pipeline.storage_ok, "the outage was not noticed"
            await asyncio.to_thread(pg_cluster.start)
            await asyncio.wait_for(asyncio.gather(*senders), 120)
            assert pipeline.storage_ok
        expected = list(range(MESSAGES_PER_SENDER))
        for device in devices:
            rows = await store.query_telemetry(
                None, device.id, TelemetryQuery(start=0, end=10**6, limit=10_000)
            )
            assert [ts for ts, _ in rows["a"]] == expected, f"device {device.name} lost points"
            assert [ts for ts, _ in rows["b"]] == expected
            assert [v for _, v in rows["b"]] == [float(n) for n in expected]
