"""A value PostgreSQL refuses (here a NUL in a string, which only a buggy adapter could
hand over now that the codec refuses it) fails only the message carrying it; the other
devices' messages in the same batch commit (item 2)."""

from __future__ import annotations

import asyncio

import pytest

from iiot.bus import LiveBus
from iiot.errors import InvalidPayload
from iiot.metrics import Metrics
from iiot.model import DevicePoints, Point
from iiot.pipeline import Pipeline, PipelineSettings
from iiot.storage import TelemetryQuery
from iiot.storage.postgres import PostgresStore

TS = 1_767_225_600_000


async def test_a_value_the_database_refuses_fails_only_its_message(pg_url: str) -> None:
    settings = PipelineSettings(max_batch_points=1000, max_delay_s=0.1, writers=1)
    async with PostgresStore(pg_url) as store:
        tenant = await store.create_tenant("acme")
        good = [await store.create_device(tenant.id, f"good{i}", f"h{i}") for i in range(5)]
        bad = await store.create_device(tenant.id, "bad", "hbad")
        async with Pipeline(store, LiveBus(), Metrics(), settings) as pipeline:
            sends = []
            for n in range(10):
                for device in good:
                    item = DevicePoints(device, (Point("t", TS + n, n),))
                    sends.append(asyncio.ensure_future(pipeline.submit(item, "test")))
                if n == 5:
                    poison = DevicePoints(bad, (Point("s", TS, "a\x00b"),))
                    refused = asyncio.ensure_future(pipeline.submit(poison, "test"))
            await asyncio.wait_for(asyncio.gather(*sends), 60)
            with pytest.raises(InvalidPayload, match="database refused"):
                await refused
        for device in good:
            rows = await store.query_telemetry(
                None, device.id, TelemetryQuery(start=TS, end=TS + 100, limit=100)
            )
            assert [p[1] for p in rows["t"]] == list(range(10))
        assert (
            await store.query_telemetry(None, bad.id, TelemetryQuery(start=0, end=TS * 2, limit=10))
            == {}
        )
