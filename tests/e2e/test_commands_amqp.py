"""Commands over AMQP end to end: an aio-pika device binds `commands.{id}`, replies on
`replies.{id}` with its token; persistent commands wait until it listens."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from iiot.adapters.amqp_commands import COMMAND_EXCHANGE
from tests.amqp_support import EXCHANGE, reset_broker
from tests.e2e.api_helpers import Api, api_platform

# The shared RabbitMQ/Mosquitto: never run these tests in parallel with each other.
pytestmark = pytest.mark.shared_brokers


async def _status(api: Api, command_id: str, status: str) -> dict[str, Any]:
    for _ in range(200):
        command: dict[str, Any] = await api.ok(
            "GET", f"/api/commands/{command_id}", headers=api.admin
        )
        if command["status"] == status:
            return command
        await asyncio.sleep(0.05)
    raise AssertionError(f"command never became {status}: {command}")


async def test_amqp_device_gets_commands_and_replies(
    tmp_path: Path, pg_url: str, amqp_url: str
) -> None:
    await reset_broker(amqp_url)
    async with api_platform(tmp_path, IIOT_DATABASE_URL=pg_url, IIOT_AMQP_URL=amqp_url) as api:
        tenant = await api.tenant("plant")
        device = await api.device(api.admin, "pump", tenant_id=tenant["id"])
        url = f"/api/devices/{device['id']}/commands"
        early = await api.ok(
            "POST", url, 202, json={"method": "early", "persistent": True}, headers=api.admin
        )
        await asyncio.sleep(1.0)
        waiting = await api.ok("GET", f"/api/commands/{early['id']}", headers=api.admin)
        assert waiting["status"] in ("QUEUED", "SENT")  # no queue bound: never DELIVERED
        path = [t["status"] for t in waiting["transitions"]]
        assert "DELIVERED" not in path
        # A queue that was not there took nothing (one send may be under way).
        assert waiting["attempts"] == (1 if waiting["status"] == "SENT" else 0)
        assert path.count("SENT") <= 1  # one look for the device's queue, not a busy loop

        received: list[dict[str, Any]] = []
        connection = await aio_pika.connect(amqp_url, timeout=10)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
            )
            commands = await channel.declare_exchange(
                COMMAND_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(exclusive=True)
            # Commands come from their own exchange, which devices cannot write to.
            await queue.bind(commands, f"commands.{device['id']}")
            token = {"token": device["token"]}

            async def on_command(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                async with message.process():
                    command = json.loads(message.body)
                    received.append(command)
                    assert message.correlation_id == command["id"]
                    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
                    assert message.content_type == "application/json"
                    await exchange.publish(
                        aio_pika.Message(
                            json.dumps({"done": command["method"]}).encode(),
                            correlation_id=message.correlation_id,
                            headers=token,
                        ),
                        routing_key=message.reply_to or "",
                    )

            await queue.consume(on_command)
            # "I listen now": the queued command follows.
            await exchange.publish(
                aio_pika.Message(b"", headers=token), routing_key=f"replies.{device['id']}"
            )
            done = await _status(api, early["id"], "SUCCESSFUL")
            assert done["response"] == {"done": "early"}
            assert [t["status"] for t in done["transitions"]][-3:] == [
                "SENT",
                "DELIVERED",
                "SUCCESSFUL",
            ]
            answer = await api.ok("POST", url, json={"method": "now"}, headers=api.admin)
            assert answer["status"] == "SUCCESSFUL" and answer["response"] == {"done": "now"}
            assert [c["method"] for c in received] == ["early", "now"]
