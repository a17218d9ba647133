"""The platform process is killed with SIGKILL mid-run and started again: nothing is lost.

Messages are acknowledged only after their points are committed, so whatever the killed
process had received but not acknowledged is redelivered by RabbitMQ to the new process,
and idempotent writes store every point exactly once.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest

from tests.amqp_support import (
    assert_exactly_once,
    count_points,
    expected_points,
    make_devices,
    publish_telemetry,
    reset_broker,
    stored_points,
    wait_consumers,
    wait_drained,
    wait_points,
)
from tests.support import free_port, platform_env, platform_process

# The shared RabbitMQ/Mosquitto: never run these tests in parallel with each other.
pytestmark = pytest.mark.shared_brokers

MESSAGES = 20_000


@pytest.fixture
async def clean_broker(amqp_url: str) -> str:
    """The shared RabbitMQ with the platform's queues and exchange deleted."""
    await reset_broker(amqp_url)
    return amqp_url


async def test_sigkill_mid_run_then_restart_stores_every_point_once(
    tmp_path: Path, pg_url: str, clean_broker: str
) -> None:
    devices = await make_devices(pg_url, 100)
    port = free_port()
    env = platform_env(
        tmp_path,
        IIOT_DATABASE_URL=pg_url,
        IIOT_AMQP_URL=clean_broker,
        IIOT_HTTP_PORT=str(port),
    )
    publisher = asyncio.create_task(publish_telemetry(clean_broker, devices, MESSAGES))
    with platform_process(env) as proc:
        await wait_consumers(clean_broker, 1, 30)
        await wait_points(pg_url, 6_000, 60)
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = await count_points(pg_url)
    # The dead process's connection is gone, and with it its consumer.
    await wait_consumers(clean_broker, 0, 30)
    await asyncio.wait_for(publisher, 180)
    assert killed_at < 3 * MESSAGES, "the kill came too late to test anything"

    with platform_process(env) as proc:
        await wait_consumers(clean_broker, 1, 30)
        await wait_drained(clean_broker, pg_url, 3 * MESSAGES, 120)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            ready = (await client.get("/readyz")).json()
            metrics = (await client.get("/metrics")).text
        assert ready["components"]["amqp"]["state"] == "up"
        assert 'iiot_points_stored_total{protocol="amqp"}' in metrics
    assert proc.returncode == 0, "the restarted platform did not stop cleanly on SIGTERM"
    assert_exactly_once(await stored_points(pg_url), expected_points(devices, MESSAGES))
