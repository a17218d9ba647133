"""Concurrent triggers over HTTP, MQTT and AMQP at once, into two platform processes sharing
one PostgreSQL database: exactly one open alarm (the database's unique index decides).

That the index decides, and not the code, is shown where the race can be forced: 50
raises from 8 connections leave one alarm with the index and several without it
(tests/integration/test_alarm_store.py). Here each process's engine raises at most once,
so dropping the index gives a duplicate only when both raise within the same moment.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest

from tests.amqp_support import reset_broker
from tests.e2e.alarm_helpers import now_ms, rule_body, wait_for
from tests.e2e.api_helpers import ADMIN_PASSWORD, bearer
from tests.integration.test_mqtt_support import connect, drop_session, wait_for_health
from tests.support import free_port, platform_env, running_platform

# The shared RabbitMQ/Mosquitto: never run these tests in parallel with each other.
pytestmark = pytest.mark.shared_brokers

MESSAGES = 50


def mqtt_burst(port: int, device_id: str, token: str, t0: int) -> None:
    """MESSAGES QoS 1 messages above the threshold, all in flight at once."""
    client = connect(port, device_id, token, f"alarm-burst-{uuid.uuid4().hex[:8]}")
    try:
        infos = [
            client.publish(
                f"devices/{device_id}/telemetry",
                json.dumps({"ts": t0 + n, "values": {"t": 81 + n}}),
                qos=1,
            )
            for n in range(MESSAGES)
        ]
        for info in infos:
            info.wait_for_publish(30)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


async def amqp_burst(url: str, device_id: str, token: str, t0: int) -> None:
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange("iiot", aio_pika.ExchangeType.TOPIC, durable=True)
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(
                        json.dumps({"ts": t0 + n, "values": {"t": 81 + n}}).encode(),
                        headers={"token": token},
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    f"telemetry.{device_id}",
                )
                for n in range(MESSAGES)
            )
        )


@pytest.mark.mosquitto
@pytest.mark.rabbitmq
async def test_simultaneous_triggers_on_every_protocol_leave_one_open_alarm(
    tmp_path: Path, pg_url: str, mosquitto: tuple[str, int], amqp_url: str
) -> None:
    await reset_broker(amqp_url)
    host, mqtt_port = mosquitto
    client_id = f"iiot-alarms-{uuid.uuid4().hex[:8]}"
    port_a, port_b = free_port(), free_port()
    env_a = platform_env(tmp_path / "a", IIOT_DATABASE_URL=pg_url, IIOT_HTTP_PORT=str(port_a))
    env_b = platform_env(
        tmp_path / "b",
        IIOT_DATABASE_URL=pg_url,
        IIOT_HTTP_PORT=str(port_b),
        IIOT_MQTT_URL=f"mqtt://{host}:{mqtt_port}?client_id={client_id}",
        IIOT_AMQP_URL=amqp_url,
    )
    try:
        async with (
            running_platform(env_a),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port_a}", timeout=30) as a_http,
        ):
            login = await a_http.post(
                "/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
            )
            admin = bearer(login.json()["access_token"])
            tenant = (
                await a_http.post("/api/tenants", json={"name": "acme"}, headers=admin)
            ).json()
            device = (
                await a_http.post(
                    "/api/devices",
                    json={"name": "boiler", "tenant_id": tenant["id"]},
                    headers=admin,
                )
            ).json()
            answer = await a_http.post(
                "/api/rules",
                json={**rule_body(device["id"]), "tenant_id": tenant["id"]},
                headers=admin,
            )
            assert answer.status_code == 201, answer.text
            # The second process starts with the rule in place.
            async with (
                running_platform(env_b) as b,
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port_b}", timeout=30) as b_http,
            ):
                await wait_for_health(b, "mqtt", "up")
                await wait_for_health(b, "amqp", "up")
                alarms = await burst(a_http, b_http, admin, device, amqp_url, mqtt_port)
        [alarm] = alarms
        assert alarm["status"] == "ACTIVE_UNACK"

    finally:
        await asyncio.to_thread(drop_session, host, mqtt_port, client_id)


async def burst(
    a_http: httpx.AsyncClient,
    b_http: httpx.AsyncClient,
    admin: dict[str, str],
    device: dict[str, Any],
    amqp_url: str,
    mqtt_port: int,
) -> list[dict[str, Any]]:
    """Every protocol at once; the alarms once both processes evaluated every point."""
    t0 = now_ms()
    token = device["token"]

    async def http_post(n: int) -> None:
        client = a_http if n % 2 else b_http
        body: dict[str, Any] = {"ts": t0 + 1000 + n, "values": {"t": 81 + n}}
        sent = await client.post(f"/api/v1/{token}/telemetry", json=body)
        assert sent.status_code == 200, sent.text

    await asyncio.gather(
        *(http_post(n) for n in range(MESSAGES)),
        asyncio.to_thread(mqtt_burst, mqtt_port, device["id"], token, t0 + 2000),
        amqp_burst(amqp_url, device["id"], token, t0 + 3000),
    )

    async def points() -> int:
        answer = await a_http.get(
            f"/api/devices/{device['id']}/telemetry",
            params={"keys": "t", "start": t0, "limit": 1000},
            headers=admin,
        )
        return len(answer.json().get("t", []))

    await wait_for(points, lambda n: n == 3 * MESSAGES, 60)

    async def alarms() -> list[dict[str, Any]]:
        page = await a_http.get("/api/alarms", headers=admin)
        items: list[dict[str, Any]] = page.json()["items"]
        return items

    # Both engines have evaluated everything once the newest point is an alarm's end_ts.
    newest = t0 + 3000 + MESSAGES - 1
    await wait_for(alarms, lambda a: any(x["end_ts"] == newest for x in a), 30)
    await asyncio.sleep(1)
    found = await alarms()
    summary = (await a_http.get("/api/alarms/summary", headers=admin)).json()
    assert summary["total"] == len(found)
    return found
