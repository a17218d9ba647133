"""AMQP ingestion against the real RabbitMQ and PostgreSQL, with a real aio-pika client.

These tests use the platform's own fixed names (`iiot`, `telemetry`, `telemetry.rejected`)
on the shared broker, deleting them before each test; run them serially.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import pytest

from iiot.adapters.amqp import AmqpAdapter
from iiot.app import Platform
from tests.amqp_support import (
    EXCHANGE,
    assert_exactly_once,
    count_points,
    expected_points,
    get_rejected,
    make_devices,
    publish_telemetry,
    queue_state,
    reset_broker,
    stored_points,
    wait_consumers,
    wait_drained,
)
from tests.support import platform_env, running_platform
from tests.tcp_proxy import TcpProxy

# The shared RabbitMQ/Mosquitto: never run these tests in parallel with each other.
pytestmark = pytest.mark.shared_brokers


def _env(tmp_path: Path, pg_url: str, amqp_url: str) -> dict[str, str]:
    return platform_env(tmp_path, IIOT_DATABASE_URL=pg_url, IIOT_AMQP_URL=amqp_url)


def _adapter(platform: Platform) -> AmqpAdapter:
    return next(c for c in platform.components if isinstance(c, AmqpAdapter))


@pytest.fixture
async def clean_broker(amqp_url: str) -> str:
    """The shared RabbitMQ with the platform's queues and exchange deleted."""
    await reset_broker(amqp_url)
    return amqp_url


async def test_10000_persistent_messages_are_stored_exactly_once(
    tmp_path: Path, pg_url: str, clean_broker: str
) -> None:
    devices = await make_devices(pg_url, 50)
    async with running_platform(_env(tmp_path, pg_url, clean_broker)) as platform:
        assert platform.services.health.components["amqp"].state == "up"
        await wait_consumers(clean_broker, 1, 10)
        await publish_telemetry(clean_broker, devices, 10_000)
        await wait_drained(clean_broker, pg_url, 30_000, 120)
        metrics = platform.services.metrics
        assert metrics.points_stored.labels("amqp")._value.get() >= 30_000
    assert_exactly_once(await stored_points(pg_url), expected_points(devices, 10_000))
    assert (await queue_state(clean_broker, "telemetry.rejected"))[0] == 0


async def test_messages_published_while_platform_is_down_are_stored_after_start(
    tmp_path: Path, pg_url: str, clean_broker: str
) -> None:
    devices = await make_devices(pg_url, 5)
    await publish_telemetry(clean_broker, devices, 300)  # durable queue holds them
    async with running_platform(_env(tmp_path, pg_url, clean_broker)):
        await wait_drained(clean_broker, pg_url, 900, 30)
    assert_exactly_once(await stored_points(pg_url), expected_points(devices, 300))


async def test_refused_messages_go_to_rejected_queue_with_reason_and_nothing_is_stored(
    tmp_path: Path, pg_url: str, clean_broker: str
) -> None:
    good, other, disabled = await make_devices(pg_url, 3)
    async with running_platform(_env(tmp_path, pg_url, clean_broker)) as platform:
        services = platform.services
        await services.store.update_device(None, disabled.id, status="disabled")
        payload = json.dumps({"ts": 1767225600001, "values": {"t": 1}}).encode()
        cases = [
            ("no-token", good.id, None, payload),
            ("wrong-token", good.id, "not-a-real-token", payload),
            ("other-device-token", good.id, other.token, payload),
            ("bad-payload", good.id, good.token, b'{"t": [1, 2'),
            ("disabled", disabled.id, disabled.token, payload),
        ]
        connection = await aio_pika.connect(clean_broker, timeout=10)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(EXCHANGE)
            for label, device_id, token, body in cases:
                headers = {"case": label}
                if token is not None:
                    headers["token"] = token
                await exchange.publish(
                    aio_pika.Message(
                        body, headers=headers, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                    ),
                    f"telemetry.{device_id}",
                )
        rejected = await get_rejected(clean_broker, len(cases))
        refused = services.metrics.messages_refused
        assert refused.labels("amqp", "unknown_token")._value.get() == 3
    by_case = {m.headers["case"]: m for m in rejected}
    assert set(by_case) == {label for label, *_ in cases}
    assert by_case["no-token"].headers["x-reject-reason"] == "unknown_token"
    assert "token" in str(by_case["no-token"].headers["x-reject-message"])
    assert by_case["wrong-token"].headers["x-reject-reason"] == "unknown_token"
    assert by_case["other-device-token"].headers["x-reject-reason"] == "unknown_token"
    assert by_case["bad-payload"].headers["x-reject-reason"] == "invalid_payload"
    assert by_case["disabled"].headers["x-reject-reason"] == "device_disabled"
    for message in rejected:
        assert "token" not in message.headers, "a device token was copied to the rejected queue"
        assert message.headers["x-reject-message"]
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert by_case["bad-payload"].body == b'{"t": [1, 2'
    assert await count_points(pg_url) == 0
    ready, _ = await queue_state(clean_broker)
    assert ready == 0


async def test_a_known_devices_bad_message_is_refused_once_and_its_good_ones_stored(
    tmp_path: Path, pg_url: str, clean_broker: str
) -> None:
    """The fast path (a cached token) refuses like the slow one, counting each message once."""
    (device,) = await make_devices(pg_url, 1)
    async with running_platform(_env(tmp_path, pg_url, clean_broker)) as platform:
        metrics = platform.services.metrics
        connection = await aio_pika.connect(clean_broker, timeout=10)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(EXCHANGE)

            async def send(case: str, body: bytes) -> None:
                message = aio_pika.Message(
                    body,
                    headers={"case": case, "token": device.token},
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                await exchange.publish(message, f"telemetry.{device.id}")

            await send("first", json.dumps({"ts": 1767225600001, "values": {"t": 1}}).encode())
            for _ in range(100):  # the first one caches the token
                if await count_points(pg_url) == 1:
                    break
                await asyncio.sleep(0.05)
            assert platform.services.registry.cached_token(device.token) is not None
            await send("bad", b'{"t": ')
            await send("second", json.dumps({"ts": 1767225600002, "values": {"t": 2}}).encode())
            rejected = await get_rejected(clean_broker, 1)
        for _ in range(100):
            if await count_points(pg_url) == 2:
                break
            await asyncio.sleep(0.05)
        assert metrics.messages_refused.labels("amqp", "invalid_payload")._value.get() == 1
        assert metrics.messages_received.labels("amqp")._value.get() == 3
    assert [m.headers["case"] for m in rejected] == ["bad"]
    assert rejected[0].headers["x-reject-reason"] == "invalid_payload"
    assert await count_points(pg_url) == 2
    ready, _ = await queue_state(clean_broker)
    assert ready == 0


async def test_broker_unreachable_at_start_reports_down_then_connects(
    tmp_path: Path, pg_url: str, clean_broker: str
) -> None:
    parts = urlsplit(clean_broker)
    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as proxy:
        proxy.refusing = True
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}{parts.path or '/'}"
        async with running_platform(_env(tmp_path, pg_url, url)) as platform:
            health = platform.services.health.components["amqp"]
            assert health.state == "down"
            assert health.detail
            proxy.refusing = False
            assert await _adapter(platform).wait_connected(15)
            assert platform.services.health.components["amqp"].state == "up"
            await wait_consumers(clean_broker, 1, 10)
        await wait_consumers(clean_broker, 0, 10)
