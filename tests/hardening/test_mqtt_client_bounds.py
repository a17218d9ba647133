"""Memory bounds of the platform's MQTT client to an external broker (item 8): it announces
a maximum packet size (the broker never sends a larger message), and it stops reading
while too much is held unsettled (QoS 0 counted too), resuming once commits settle it."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import paho.mqtt.client as paho
import pytest

from iiot.adapters import mqtt_session
from iiot.adapters.mqtt import MqttAdapter
from tests.integration.test_mqtt_support import (
    connect,
    create_devices,
    drop_session,
    wait_for_health,
    wait_for_rows,
)
from tests.support import platform_env, running_platform
from tests.tcp_proxy import TcpProxy

# The shared RabbitMQ/Mosquitto: never run these tests in parallel with each other.
pytestmark = pytest.mark.shared_brokers

TS = 1_767_225_600_000


@pytest.fixture
def client_id(mosquitto: tuple[str, int]) -> Any:
    name = f"iiot-test-{uuid.uuid4().hex[:10]}"
    yield name
    drop_session(*mosquitto, name)


def _publish(port: int, dev: Any, bodies: list[bytes], qos: int = 1) -> None:
    client: paho.Client = connect(port, dev.id, dev.token, f"pub-{uuid.uuid4().hex[:8]}")
    try:
        infos = [client.publish(f"devices/{dev.id}/telemetry", b, qos=qos) for b in bodies]
        for info in infos:
            info.wait_for_publish(20)
    finally:
        client.disconnect()
        client.loop_stop()


async def test_broker_never_sends_a_message_over_the_maximum_packet_size(
    tmp_path: Path, pg_url: str, mosquitto: tuple[str, int], client_id: str
) -> None:
    host, port = mosquitto
    url = f"mqtt://{host}:{port}?client_id={client_id}"
    env = platform_env(
        tmp_path, IIOT_DATABASE_URL=pg_url, IIOT_MQTT_URL=url, IIOT_MAX_MESSAGE_BYTES="65536"
    )
    async with running_platform(env) as platform:
        await wait_for_health(platform, "mqtt", "up")
        [dev] = await create_devices(platform, 1)
        huge = json.dumps({"ts": TS, "values": {"blob": "x" * 300_000}}).encode()
        good = [json.dumps({"ts": TS + n, "values": {"t": n}}).encode() for n in range(1, 21)]
        await asyncio.to_thread(_publish, port, dev, [huge, *good])
        assert await wait_for_rows(pg_url, 20, 30) == 20
        metrics = platform.services.metrics
        # Refused by the broker on the platform's behalf: never read, never counted.
        assert metrics.messages_refused.labels("mqtt", "too_large")._value.get() == 0


async def test_reading_pauses_while_too_much_is_held_then_resumes(
    tmp_path: Path,
    pg_url: str,
    mosquitto: tuple[str, int],
    client_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mqtt_session, "MAX_HELD_BYTES", 32 * 1024)
    host, port = mosquitto
    parts = urlsplit(pg_url)
    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        proxied = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
        url = f"mqtt://{host}:{port}?client_id={client_id}"
        env = platform_env(tmp_path, IIOT_DATABASE_URL=proxied, IIOT_MQTT_URL=url)
        async with running_platform(env) as platform:
            adapter = next(c for c in platform.components if isinstance(c, MqttAdapter))
            await wait_for_health(platform, "mqtt", "up")
            [dev] = await create_devices(platform, 1)
            await asyncio.to_thread(
                _publish, port, dev, [json.dumps({"ts": TS, "values": {"t": 0}}).encode()]
            )
            assert await wait_for_rows(pg_url, 1, 30) == 1
            proxy.refusing = True
            proxy.cut()
            pad = "p" * 1000
            bodies = [
                json.dumps({"ts": TS + n, "values": {"t": n, "pad": pad}}).encode()
                for n in range(1, 201)
            ]
            publisher = asyncio.create_task(asyncio.to_thread(_publish, port, dev, bodies, 1))
            session = adapter._session
            assert session is not None
            for _ in range(100):
                if session.paused:
                    break
                await asyncio.sleep(0.1)
            assert session.paused, "the client kept reading with everything unsettled"
            # Bounded: at most the limit plus what one socket read brought in.
            assert session.held_bytes <= 32 * 1024 + 256 * 1024
            assert session.held < 200
            proxy.refusing = False
            await publisher
            assert await wait_for_rows(pg_url, 401, 60) == 401
            assert not session.paused and adapter.sessions == 1
