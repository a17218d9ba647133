"""IIOT_AMQP_QUEUE_TYPE=quorum: the platform's queues are quorum queues, and ingest works."""

from __future__ import annotations

from pathlib import Path

import aio_pika
import aiormq
import pytest

from tests.amqp_support import (
    EXCHANGE,
    QUEUE,
    REJECTED,
    make_devices,
    message_body,
    reset_broker,
    stored_points,
    wait_consumers,
    wait_points,
)
from tests.support import platform_env, running_platform

# The shared RabbitMQ/Mosquitto: never run these tests in parallel with each other.
pytestmark = pytest.mark.shared_brokers


async def test_quorum_queues_are_declared_and_consumed(
    tmp_path: Path, pg_url: str, amqp_url: str
) -> None:
    await reset_broker(amqp_url)
    devices = await make_devices(pg_url, 5)
    env = platform_env(
        tmp_path, IIOT_DATABASE_URL=pg_url, IIOT_AMQP_URL=amqp_url, IIOT_AMQP_QUEUE_TYPE="quorum"
    )
    try:
        async with running_platform(env):
            await wait_consumers(amqp_url, 1, 30)
            connection = await aio_pika.connect(amqp_url, timeout=10)
            async with connection:
                channel = await connection.channel()
                # A quorum queue accepts a quorum declaration; a classic one would refuse it.
                for name in (QUEUE, REJECTED):
                    await channel.declare_queue(
                        name, durable=True, arguments={"x-queue-type": "quorum"}
                    )
                with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
                    await (await connection.channel()).declare_queue(QUEUE, durable=True)
                confirm = await connection.channel(publisher_confirms=True)
                exchange = await confirm.get_exchange(EXCHANGE)
                for seq in range(100):
                    device = devices[seq % len(devices)]
                    await exchange.publish(
                        aio_pika.Message(
                            message_body(seq),
                            headers={"token": device.token},
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        f"telemetry.{device.id}",
                    )
            await wait_points(pg_url, 300, 30)
    finally:
        await reset_broker(amqp_url)
    rows = await stored_points(pg_url)
    assert len(rows) == len(set(rows)) == 300
