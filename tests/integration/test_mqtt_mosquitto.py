"""The platform subscribed to a real Mosquitto: exactly-once storage with paho and mosquitto_pub."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

from tests.integration.test_mqtt_support import (
    create_devices,
    drop_session,
    mosquitto_pub_lines,
    publish_all,
    telemetry_counts,
    unacked_messages,
    wait_for_health,
    wait_for_rows,
)
from tests.support import platform_env, running_platform

# The shared RabbitMQ/Mosquitto: never run these tests in parallel with each other.
pytestmark = pytest.mark.shared_brokers


@pytest.fixture
def client_id(mosquitto):
    """A platform client id of its own, its session removed from the shared broker after."""
    name = f"iiot-test-{uuid.uuid4().hex[:10]}"
    yield name
    drop_session(*mosquitto, name)


async def test_10000_paho_messages_stored_exactly_once(tmp_path, pg_url, mosquitto, client_id):
    host, port = mosquitto
    url = f"mqtt://{host}:{port}?client_id={client_id}"
    env = platform_env(tmp_path, IIOT_DATABASE_URL=pg_url, IIOT_MQTT_URL=url)
    async with running_platform(env) as platform:
        await wait_for_health(platform, "mqtt", "up")
        devices = await create_devices(platform, 10)
        await asyncio.to_thread(publish_all, port, devices, 1000)
        rows = await wait_for_rows(pg_url, 30_000)
        assert (rows, (await telemetry_counts(pg_url))[1]) == (30_000, 30_000)
    # Every message was acknowledged: the broker holds none for the platform's session.
    assert await asyncio.to_thread(unacked_messages, host, port, client_id) == 0


async def test_10000_mosquitto_pub_messages_stored_exactly_once(
    tmp_path, pg_url, mosquitto, client_id, caplog
):
    host, port = mosquitto
    url = f"mqtt://{host}:{port}?client_id={client_id}"
    env = platform_env(tmp_path, IIOT_DATABASE_URL=pg_url, IIOT_MQTT_URL=url)
    with caplog.at_level(logging.WARNING, logger="iiot"):
        async with running_platform(env) as platform:
            await wait_for_health(platform, "mqtt", "up")
            [dev] = await create_devices(platform, 1)
            done = await asyncio.to_thread(mosquitto_pub_lines, port, dev, 10_000)
            assert done.returncode == 0, done.stderr
            rows = await wait_for_rows(pg_url, 30_000)
            assert (rows, (await telemetry_counts(pg_url))[1]) == (30_000, 30_000)
    assert await asyncio.to_thread(unacked_messages, host, port, client_id) == 0
    # The shared test broker is open: the platform says so at start.
    assert any("anonymous clients publish" in r.getMessage() for r in caplog.records)
