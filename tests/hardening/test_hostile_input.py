"""Hostile input on every protocol, beside a steady stream of good messages from another
device (issue: hostile-input suite). Every hostile message is refused cleanly (HTTP 4xx,
CoAP 4.xx, AMQP to telemetry.rejected with a reason, MQTT counted as refused and settled),
nothing answers 5xx, and the good stream is stored exactly: every message once.

The platform runs on PostgreSQL (which refuses NUL and lone surrogates that SQLite would
store). The commit timeout is short, so a good message stalled behind a bad one would
surface as a 503 / 5.03."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aiocoap
import asyncpg
import httpx
import paho.mqtt.client as paho
import pytest
from aiocoap.numbers.codes import Code

from iiot.adapters.amqp import AmqpAdapter
from iiot.adapters.mqtt import MqttAdapter
from iiot.app import Platform
from tests.amqp_support import get_rejected, reset_broker
from tests.hardening.hostile import TS, good_body, hostile_payloads
from tests.integration.test_mqtt_support import (
    connect,
    drop_session,
    wait_for_health,
)
from tests.support import free_port, platform_env, running_platform

# The shared RabbitMQ/Mosquitto: never run these tests in parallel with each other.
pytestmark = pytest.mark.shared_brokers

HOSTILE = 120
GOOD = 150
LIMIT = 65536


async def _good_rows(pg_url: str, device_id: Any) -> list[int]:
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch(
            "SELECT ts FROM telemetry WHERE device_id = $1 AND key = 'seq' ORDER BY ts",
            device_id,
        )
        return [int(r["ts"]) - TS for r in rows]
    finally:
        await conn.close()


async def _wait_good(pg_url: str, device_id: Any, timeout_s: float = 60) -> list[int]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        rows = await _good_rows(pg_url, device_id)
        if len(rows) >= GOOD or asyncio.get_running_loop().time() > deadline:
            await asyncio.sleep(0.5)  # room for a duplicate to show
            return await _good_rows(pg_url, device_id)
        await asyncio.sleep(0.2)


async def _devices(platform: Platform) -> tuple[Any, str, Any, str]:
    registry = platform.services.registry
    tenant = await platform.services.store.create_tenant(f"t-{uuid.uuid4().hex[:6]}")
    bad, bad_token = await registry.create_device(tenant.id, "hostile")
    good, good_token = await registry.create_device(tenant.id, "good")
    return bad, bad_token, good, good_token


@pytest.fixture
def env(tmp_path: Path, pg_url: str) -> dict[str, str]:
    return platform_env(
        tmp_path,
        IIOT_DATABASE_URL=pg_url,
        IIOT_MAX_MESSAGE_BYTES=str(LIMIT),
        IIOT_COMMIT_TIMEOUT_S="10",
    )


@pytest.fixture(scope="module")
def payloads() -> list[bytes]:
    return hostile_payloads(HOSTILE)


async def test_http(env: dict[str, str], pg_url: str, payloads: list[bytes]) -> None:
    port = free_port()
    async with (
        running_platform({**env, "IIOT_HTTP_PORT": str(port)}) as platform,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client,
    ):
        bad, bad_token, good, good_token = await _devices(platform)

        async def good_stream() -> list[int]:
            codes = []
            for seq in range(GOOD):
                answer = await client.post(
                    f"/api/v1/{good_token}/telemetry", content=good_body(seq)
                )
                codes.append(answer.status_code)
            return codes

        stream = asyncio.create_task(good_stream())
        for body in payloads:
            answer = await client.post(
                f"/api/v1/{bad_token}/telemetry",
                content=body,
                headers={"content-type": "application/json"},
            )
            assert answer.status_code in (400, 413), (body[:80], answer.text)
            assert answer.json()["detail"]
        assert set(await stream) == {200}
        assert await _wait_good(pg_url, good.id) == list(range(GOOD))
        assert await _good_rows(pg_url, bad.id) == []


async def test_coap(env: dict[str, str], pg_url: str, payloads: list[bytes]) -> None:
    port = free_port(socket.SOCK_DGRAM)
    async with running_platform({**env, "IIOT_COAP_PORT": str(port)}) as platform:
        bad, bad_token, good, good_token = await _devices(platform)
        client = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:

            async def post(token: str, body: bytes) -> aiocoap.Message:
                message = aiocoap.Message(
                    code=Code.POST,
                    uri=f"coap://127.0.0.1:{port}/api/v1/{token}/telemetry",
                    payload=body,
                )
                return await asyncio.wait_for(client.request(message).response, 60)

            async def good_stream() -> list[Code]:
                return [(await post(good_token, good_body(seq))).code for seq in range(GOOD)]

            stream = asyncio.create_task(good_stream())
            for body in payloads:
                answer = await post(bad_token, body)
                assert answer.code.class_ == 4, (body[:80], answer.code, answer.payload)
                assert answer.payload  # the diagnostic payload says what is wrong
            assert set(await stream) == {Code.CHANGED}
        finally:
            await client.shutdown()
        assert await _wait_good(pg_url, good.id) == list(range(GOOD))
        assert await _good_rows(pg_url, bad.id) == []


async def test_amqp(env: dict[str, str], pg_url: str, amqp_url: str, payloads: list[bytes]) -> None:
    await reset_broker(amqp_url)
    async with running_platform({**env, "IIOT_AMQP_URL": amqp_url}) as platform:
        adapter = next(c for c in platform.components if isinstance(c, AmqpAdapter))
        assert await adapter.wait_connected(15)
        bad, bad_token, good, good_token = await _devices(platform)
        connection = await aio_pika.connect(amqp_url, timeout=10)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange("iiot")

            async def send(device: Any, token: str, body: bytes, case: str) -> None:
                message = aio_pika.Message(body, headers={"token": token, "case": case})
                await exchange.publish(message, f"telemetry.{device.id}")

            for i, body in enumerate(payloads):
                await send(bad, bad_token, body, str(i))
                for seq in range(i * GOOD // len(payloads), (i + 1) * GOOD // len(payloads)):
                    await send(good, good_token, good_body(seq), "good")
            rejected = await get_rejected(amqp_url, len(payloads), 60)
        assert sorted(int(m.headers["case"]) for m in rejected) == list(range(len(payloads)))
        reasons = {m.headers["x-reject-reason"] for m in rejected}
        assert reasons <= {"invalid_payload", "too_large"}
        assert await _wait_good(pg_url, good.id) == list(range(GOOD))
        assert await _good_rows(pg_url, bad.id) == []


@pytest.fixture
def client_id(mosquitto: tuple[str, int]) -> AsyncIterator[str]:
    name = f"iiot-test-{uuid.uuid4().hex[:10]}"
    yield name  # type: ignore[misc]
    drop_session(*mosquitto, name)


async def test_mqtt_external_broker(
    env: dict[str, str],
    pg_url: str,
    mosquitto: tuple[str, int],
    client_id: str,
    payloads: list[bytes],
) -> None:
    host, port = mosquitto
    url = f"mqtt://{host}:{port}?client_id={client_id}"
    async with running_platform({**env, "IIOT_MQTT_URL": url}) as platform:
        await wait_for_health(platform, "mqtt", "up")
        bad, bad_token, good, good_token = await _devices(platform)

        def publish() -> None:
            hostile: paho.Client = connect(port, str(bad.id), bad_token, f"h-{client_id}")
            friendly: paho.Client = connect(port, str(good.id), good_token, f"g-{client_id}")
            try:
                infos = []
                for i, body in enumerate(payloads):
                    infos.append(hostile.publish(f"devices/{bad.id}/telemetry", body, qos=1))
                    for seq in range(i * GOOD // len(payloads), (i + 1) * GOOD // len(payloads)):
                        topic = f"devices/{good.id}/telemetry"
                        infos.append(friendly.publish(topic, good_body(seq), qos=1))
                for info in infos:
                    info.wait_for_publish(30)
            finally:
                for client in (hostile, friendly):
                    client.disconnect()
                    client.loop_stop()

        await asyncio.to_thread(publish)
        assert await _wait_good(pg_url, good.id) == list(range(GOOD))
        assert await _good_rows(pg_url, bad.id) == []
        metrics = platform.services.metrics
        refused = sum(
            metrics.messages_refused.labels("mqtt", reason)._value.get()
            for reason in ("invalid_payload", "too_large")
        )
        assert refused == len(payloads)
        # Every message, hostile ones included, was settled (acknowledged to the broker).
        adapter = next(c for c in platform.components if isinstance(c, MqttAdapter))
        assert adapter._session is not None and adapter._session.held == 0
