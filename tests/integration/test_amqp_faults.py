"""AMQP ingestion under faults: broker connections cut mid-run, refused reconnects.

The platform reaches the shared RabbitMQ through a TCP proxy that can cut every connection
and refuse new ones (a broker restart as the platform sees it), so the shared broker keeps
running for everyone else. One test closes connections on the broker itself with
`rabbitmqctl close_all_connections`. After each fault: zero points lost, zero duplicates,
and the queue has its consumer back.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from iiot.adapters.amqp import AmqpAdapter
from iiot.app import Platform
from tests.amqp_support import (
    assert_exactly_once,
    expected_points,
    make_devices,
    publish_telemetry,
    queue_state,
    reset_broker,
    stored_points,
    wait_consumers,
    wait_drained,
    wait_points,
)
from tests.pgcluster import PgCluster, pg_cluster
from tests.support import platform_env, running_platform
from tests.tcp_proxy import TcpProxy

# The shared RabbitMQ/Mosquitto: never run these tests in parallel with each other.
pytestmark = pytest.mark.shared_brokers

__all__ = ["pg_cluster"]  # the private-cluster fixture, imported for the outage test

MESSAGES = 20_000
POINTS = 3 * MESSAGES


def _adapter(platform: Platform) -> AmqpAdapter:
    return next(c for c in platform.components if isinstance(c, AmqpAdapter))


@pytest.fixture
async def clean_broker(amqp_url: str) -> str:
    """The shared RabbitMQ with the platform's queues and exchange deleted."""
    await reset_broker(amqp_url)
    return amqp_url


async def test_broker_outage_mid_run_loses_nothing_and_consumer_returns(
    tmp_path: Path, pg_url: str, clean_broker: str
) -> None:
    devices = await make_devices(pg_url, 100)
    parts = urlsplit(clean_broker)
    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as proxy:
        env = platform_env(
            tmp_path,
            IIOT_DATABASE_URL=pg_url,
            IIOT_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{proxy.port}{parts.path or '/'}",
        )
        async with running_platform(env) as platform:
            adapter = _adapter(platform)
            health = platform.services.health
            publisher = asyncio.create_task(publish_telemetry(clean_broker, devices, MESSAGES))
            await wait_points(pg_url, 6_000, 60)
            # The broker "restarts": every connection drops, reconnects refused for 3 s.
            outage = asyncio.create_task(proxy.outage(3.0))
            await asyncio.sleep(0.5)
            assert health.components["amqp"].state == "down"
            assert health.components["amqp"].detail
            await outage
            await publisher
            await wait_drained(clean_broker, pg_url, POINTS, 120)
            await wait_consumers(clean_broker, 1, 15)
            assert adapter.sessions >= 2
            assert health.components["amqp"].state == "up"
            redeliveries = platform.services.metrics.redeliveries.labels("amqp")._value.get()
        assert_exactly_once(await stored_points(pg_url), expected_points(devices, MESSAGES))
    # Messages in flight at the cut were redelivered, and stored once all the same.
    assert redeliveries > 0


async def test_repeated_connection_cuts_never_leave_the_queue_without_consumer(
    tmp_path: Path, pg_url: str, clean_broker: str
) -> None:
    devices = await make_devices(pg_url, 20)
    parts = urlsplit(clean_broker)
    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as proxy:
        env = platform_env(
            tmp_path,
            IIOT_DATABASE_URL=pg_url,
            IIOT_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{proxy.port}{parts.path or '/'}",
        )
        async with running_platform(env) as platform:
            adapter = _adapter(platform)
            for round_ in range(5):
                await wait_consumers(clean_broker, 1, 15)
                proxy.cut()  # abrupt: no AMQP close handshake
                await wait_consumers(clean_broker, 0, 15)
                assert await adapter.wait_connected(15), f"no reconnection after cut {round_}"
            await wait_consumers(clean_broker, 1, 15)
            # And the consumer really consumes.
            await publish_telemetry(clean_broker, devices, 1_000)
            await wait_drained(clean_broker, pg_url, 3_000, 60)
    assert_exactly_once(await stored_points(pg_url), expected_points(devices, 1_000))


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="rabbitmqctl not installed")
async def test_rabbitmqctl_close_all_connections_mid_run(
    tmp_path: Path, pg_url: str, clean_broker: str
) -> None:
    devices = await make_devices(pg_url, 100)
    vhost = urlsplit(clean_broker).path[1:] or "/"
    env = platform_env(tmp_path, IIOT_DATABASE_URL=pg_url, IIOT_AMQP_URL=clean_broker)
    async with running_platform(env) as platform:
        adapter = _adapter(platform)
        # The publisher is cut too: it reconnects and republishes its unconfirmed window,
        # as an at-least-once gateway does (duplicates must still be stored once).
        publisher = asyncio.create_task(
            publish_telemetry(clean_broker, devices, MESSAGES, retry_s=60)
        )
        await wait_points(pg_url, 6_000, 60)
        done = await asyncio.to_thread(
            subprocess.run,
            # -p: the test's own virtual host (rabbitmqctl's default is "/").
            ["rabbitmqctl", "close_all_connections", "-p", vhost, "iiot fault test"],
            capture_output=True,
            timeout=60,
        )
        if done.returncode != 0:
            pytest.skip(f"rabbitmqctl not permitted here: {done.stderr.decode()[:200]}")
        await asyncio.wait_for(publisher, 120)
        await wait_drained(clean_broker, pg_url, POINTS, 120)
        await wait_consumers(clean_broker, 1, 15)
        assert adapter.sessions >= 2
        assert platform.services.health.components["amqp"].state == "up"
    assert_exactly_once(await stored_points(pg_url), expected_points(devices, MESSAGES))


async def test_postgres_stopped_20_s_mid_run_loses_nothing(
    tmp_path: Path, pg_cluster: PgCluster, clean_broker: str
) -> None:
    db_url = pg_cluster.url()
    devices = await make_devices(db_url, 100)
    env = platform_env(tmp_path, IIOT_DATABASE_URL=db_url, IIOT_AMQP_URL=clean_broker)
    async with running_platform(env) as platform:
        publisher = asyncio.create_task(publish_telemetry(clean_broker, devices, MESSAGES))
        await wait_points(db_url, 6_000, 60)
        await asyncio.to_thread(pg_cluster.stop, "fast")
        try:
            await asyncio.sleep(20)
            # Nothing was refused for the outage: messages wait (unacked) or are requeued.
            refused = platform.services.metrics.messages_refused
            assert refused.labels("amqp", "unknown_token")._value.get() == 0
            assert refused.labels("amqp", "invalid_payload")._value.get() == 0
        finally:
            await asyncio.to_thread(pg_cluster.start)
        await asyncio.wait_for(publisher, 180)
        await wait_drained(clean_broker, db_url, POINTS, 180)
        await wait_consumers(clean_broker, 1, 15)
    assert_exactly_once(await stored_points(db_url), expected_points(devices, MESSAGES))
    assert (await queue_state(clean_broker, "telemetry.rejected"))[0] == 0
