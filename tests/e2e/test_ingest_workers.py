"""`iiot run --role ingest --workers 2`: two processes share every ingest protocol.

CoAP requests reach one UDP port that both workers bind; MQTT devices publish to a
private Mosquitto read by the workers through a shared subscription; AMQP devices publish
to RabbitMQ, where both workers are consumers of the `telemetry` queue. Every point is
stored exactly once, and stopping the command stops both workers.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.amqp_support import (
    TestDevice,
    make_devices,
    publish_telemetry,
    reset_broker,
    stored_points,
    wait_consumers,
    wait_for,
)
from tests.e2e.test_three_nodes import Node, coap_load, message_body, mqtt_publish, points_of
from tests.integration.test_mqtt_support import private_mosquitto
from tests.support import free_port, platform_env

# The shared RabbitMQ/Mosquitto: never run these tests in parallel with each other.
pytestmark = pytest.mark.shared_brokers

MESSAGES = 2_000
COAP_MESSAGES = 200


async def test_two_ingest_workers_share_coap_mqtt_and_amqp(
    tmp_path: Path, pg_url: str, amqp_url: str
) -> None:
    await reset_broker(amqp_url)
    devices = await make_devices(pg_url, 30)
    mqtt_devices, amqp_devices, coap_devices = devices[:10], devices[10:20], devices[20:]
    with private_mosquitto(tmp_path) as broker:
        data = tmp_path / "data"
        data.mkdir()
        env = platform_env(
            data,
            IIOT_DATABASE_URL=pg_url,
            IIOT_HTTP_PORT=str(free_port()),
            IIOT_COAP_PORT=str(free_port(socket.SOCK_DGRAM)),
            IIOT_MQTT_URL=f"mqtt://127.0.0.1:{broker.port}",
            IIOT_AMQP_URL=amqp_url,
            IIOT_LOG_LEVEL="INFO",
        )
        group = Node(env, tmp_path / "workers.log", ("--role", "ingest", "--workers", "2"))
        try:
            group.start()
            async with httpx.AsyncClient(timeout=5) as client:
                await group.ready(client)
            # Both workers consume: two consumers on the queue.
            await wait_consumers(amqp_url, 2, 60)
            mqtt = asyncio.to_thread(mqtt_publish, broker.port, mqtt_devices, 0, MESSAGES)
            amqp = publish_telemetry(amqp_url, amqp_devices, MESSAGES, start=100_000)
            coap = coap_load([group], coap_devices, 200_000, COAP_MESSAGES)
            mqtt_acked, _, coap_acked = await asyncio.gather(mqtt, amqp, coap)
            assert len(mqtt_acked) == MESSAGES and len(coap_acked) == COAP_MESSAGES
            expected = (
                points_of(mqtt_devices, range(MESSAGES))
                | points_of(amqp_devices, range(100_000, 100_000 + MESSAGES))
                | points_of(coap_devices, range(200_000, 200_000 + COAP_MESSAGES))
            )

            async def all_stored() -> bool:
                return len(await stored_points(pg_url)) >= len(expected)

            await wait_for(all_stored, 60, "every point stored", 0.5)
        finally:
            code = group.stop()
        log = group.log.read_text()
    assert code == 0, log
    assert "2 ingest workers" in log
    rows = await stored_points(pg_url)
    assert len(rows) == len(set(rows)), "a point was stored twice"
    assert set(rows) == expected
    # The shared subscription: one persistent session per worker on the broker.
    assert log.count("$share/iiot/devices/+/telemetry") >= 2


async def test_two_ingest_workers_share_the_embedded_mqtt_endpoint(
    tmp_path: Path, pg_url: str
) -> None:
    devices = await make_devices(pg_url, 10)
    data = tmp_path / "data"
    data.mkdir()
    mqtt_port = free_port()
    env = platform_env(
        data,
        IIOT_DATABASE_URL=pg_url,
        IIOT_HTTP_PORT=str(free_port()),
        IIOT_MQTT_PORT=str(mqtt_port),
        IIOT_LOG_LEVEL="INFO",
    )
    group = Node(env, tmp_path / "workers.log", ("--role", "ingest", "--workers", "2"))
    try:
        group.start()
        async with httpx.AsyncClient(timeout=5) as client:
            await group.ready(client)
        # One connection per device: the kernel spreads them over both workers' listeners.
        batches = [
            asyncio.to_thread(_device_publish, mqtt_port, device, index * 200, 200)
            for index, device in enumerate(devices)
        ]
        acked = [seq for batch in await asyncio.gather(*batches) for seq in batch]
        assert sorted(acked) == list(range(2_000))

        async def all_stored() -> bool:
            return len(await stored_points(pg_url)) >= 6_000  # 3 points a message

        await wait_for(all_stored, 60, "every point stored", 0.5)
    finally:
        code = group.stop()
    log = group.log.read_text()
    assert code == 0, log
    assert log.count(f":{mqtt_port} (embedded endpoint") == 2, log
    rows = await stored_points(pg_url)
    assert len(rows) == len(set(rows)) == 6_000


def _device_publish(port: int, device: TestDevice, start: int, count: int) -> list[int]:
    """A device's QoS 1 publishes on its own connection; the sequence numbers PUBACKed."""
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.username_pw_set(str(device.id), device.token)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        sent = [
            (seq, client.publish(f"devices/{device.id}/telemetry", message_body(seq), 1))
            for seq in range(start, start + count)
        ]
        acked = []
        for seq, info in sent:
            info.wait_for_publish(20)
            if info.is_published():
                acked.append(seq)
        return acked
    finally:
        client.disconnect()
        client.loop_stop()
