"""Alarm events on RabbitMQ: exchange `iiot`, routing key `alarms.{device_id}`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aio_pika
import pytest

from tests.amqp_support import reset_broker
from tests.e2e.alarm_helpers import now_ms, rule_body, send
from tests.e2e.api_helpers import api_platform

# The shared RabbitMQ/Mosquitto: never run these tests in parallel with each other.
pytestmark = pytest.mark.shared_brokers


@pytest.mark.rabbitmq
async def test_alarm_changes_are_published_with_the_device_in_the_routing_key(
    tmp_path: Path, amqp_url: str
) -> None:
    await reset_broker(amqp_url)
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange("iiot", aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "alarms.*")
        async with api_platform(tmp_path, IIOT_AMQP_URL=amqp_url) as api:
            tenant = await api.tenant("acme")
            _, admin = await api.user("acme-admin", "tenant_admin", tenant["id"])
            device = await api.device(admin, "boiler")
            await api.ok("POST", "/api/rules", 201, json=rule_body(device["id"]), headers=admin)
            t0 = now_ms()
            await send(api, device["token"], t0, t=88)
            await send(api, device["token"], t0 + 1000, t=10)
            received = []
            async with queue.iterator(timeout=15) as messages:
                async for message in messages:
                    async with message.process():
                        received.append((message.routing_key, json.loads(message.body)))
                    if len(received) == 2:
                        break
    assert [key for key, _ in received] == [f"alarms.{device['id']}"] * 2
    assert [body["event"] for _, body in received] == ["alarm.raised", "alarm.cleared"]
    raised = received[0][1]["data"]
    assert (raised["value"], raised["status"], raised["device_id"]) == (
        88,
        "ACTIVE_UNACK",
        device["id"],
    )
    assert received[1][1]["data"]["status"] == "CLEARED_UNACK"
    await asyncio.sleep(0)
