"""Every delivery callback settles its one message, even when ingesting it raises
(item 1): the AMQP fast path keeps acknowledging in order, and the external MQTT client
does not mistake the error for a malformed packet from the broker and reconnect.

A bug is simulated by making the ingest decoder raise for one marked message (the way a
5,000-digit number made `json.loads` raise a plain `ValueError` before the codec fix)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import paho.mqtt.client as paho
import pytest

from iiot.adapters.amqp import AmqpAdapter
from iiot.adapters.mqtt import MqttAdapter
from iiot.app import Platform
from iiot.ingest import Ingestor
from tests.amqp_support import (
    count_points,
    get_rejected,
    make_devices,
    queue_state,
    reset_broker,
    wait_points,
)
from tests.integration.test_mqtt_support import (
    connect,
    create_devices,
    drop_session,
    wait_for_health,
    wait_for_rows,
)
from tests.support import platform_env, running_platform

# The shared RabbitMQ/Mosquitto: never run these tests in parallel with each other.
pytestmark = pytest.mark.shared_brokers

TS = 1_767_225_600_000
MARK = b"BUG"


def _install_bug(platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    ingestor: Ingestor = platform.services.ingestor
    original = ingestor._decode

    def buggy(device: Any, body: bytes, protocol: str, decode: Any) -> Any:
        if MARK in body:
            raise ValueError("a bug in decoding")
        return original(device, body, protocol, decode)

    monkeypatch.setattr(ingestor, "_decode", buggy)


def _body(n: int) -> bytes:
    return json.dumps({"ts": TS + n, "values": {"t": n}}).encode()


async def test_amqp_fast_path_settles_a_message_whose_ingest_raises(
    tmp_path: Path, pg_url: str, amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await reset_broker(amqp_url)
    first, second = await make_devices(pg_url, 2)
    env = platform_env(tmp_path, IIOT_DATABASE_URL=pg_url, IIOT_AMQP_URL=amqp_url)
    async with running_platform(env) as platform:
        adapter = next(c for c in platform.components if isinstance(c, AmqpAdapter))
        assert await adapter.wait_connected(15)
        _install_bug(platform, monkeypatch)
        connection = await aio_pika.connect(amqp_url, timeout=10)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange("iiot")

            async def send(device: Any, body: bytes) -> None:
                message = aio_pika.Message(body, headers={"token": device.token})
                await exchange.publish(message, f"telemetry.{device.id}")

            await send(first, _body(0))  # caches the token: later ones take the fast path
            await wait_points(pg_url, 1, 20)
            await send(first, b'{"t": "' + MARK + b'"}')
            for n in range(1, 41):
                await send(first if n % 2 else second, _body(n))
            await wait_points(pg_url, 41, 30)
            rejected = await get_rejected(amqp_url, 1)
        assert [m.body for m in rejected] == [b'{"t": "' + MARK + b'"}']
        assert rejected[0].headers["x-reject-reason"] == "error"
    # Every delivery was acknowledged: nothing returns to the queue when the platform leaves.
    ready, _ = await queue_state(amqp_url)
    assert ready == 0
    assert await count_points(pg_url) == 41


@pytest.fixture
def client_id(mosquitto: tuple[str, int]) -> Any:
    name = f"iiot-test-{uuid.uuid4().hex[:10]}"
    yield name
    drop_session(*mosquitto, name)


async def test_external_mqtt_client_settles_a_message_whose_ingest_raises(
    tmp_path: Path,
    pg_url: str,
    mosquitto: tuple[str, int],
    client_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host, port = mosquitto
    url = f"mqtt://{host}:{port}?client_id={client_id}"
    env = platform_env(tmp_path, IIOT_DATABASE_URL=pg_url, IIOT_MQTT_URL=url)
    async with running_platform(env) as platform:
        adapter = next(c for c in platform.components if isinstance(c, MqttAdapter))
        await wait_for_health(platform, "mqtt", "up")
        [dev] = await create_devices(platform, 1)
        _install_bug(platform, monkeypatch)
        sessions = adapter.sessions

        def publish() -> None:
            client: paho.Client = connect(port, dev.id, dev.token, f"pub-{dev.id[:8]}")
            try:
                topic = f"devices/{dev.id}/telemetry"
                client.publish(topic, _body(0), qos=1).wait_for_publish(10)
                infos = [client.publish(topic, b'{"t": "' + MARK + b'"}', qos=1)]
                infos += [client.publish(topic, _body(n), qos=1) for n in range(1, 31)]
                for info in infos:
                    info.wait_for_publish(10)
            finally:
                client.disconnect()
                client.loop_stop()

        await asyncio.to_thread(publish)
        assert await wait_for_rows(pg_url, 31, 30) == 31
        await asyncio.sleep(0.5)
        assert adapter.sessions == sessions, "the client reconnected over one bad message"
        # Every message was settled (acknowledged to the broker), the bad one included.
        assert adapter._session is not None and adapter._session.held == 0
