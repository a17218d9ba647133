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

from tests.amqp_support import (
    make_devices,
    publish_telemetry,
    reset_broker,
    stored_points,
    wait_consumers,
    wait_for,
)
from tests.e2e.test_three_nodes import Node, coap_load, mqtt_publish, points_of
from tests.integration.test_mqtt_support import private_mosquitto
from tests.support import free_port, platform_env

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
