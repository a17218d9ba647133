"""A message without `ts` is stamped with its receipt time once: when storage is down
and the message is retried, it is not stored a second time under a later time (item 7)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest

from iiot.adapters.amqp import AmqpAdapter
from tests.amqp_support import make_devices, queue_state, reset_broker, wait_points
from tests.support import platform_env, running_platform
from tests.tcp_proxy import TcpProxy

# The shared RabbitMQ/Mosquitto: never run these tests in parallel with each other.
pytestmark = pytest.mark.shared_brokers


async def _rows(pg_url: str, key: str) -> int:
    conn = await asyncpg.connect(pg_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM telemetry WHERE key = $1", key))
    finally:
        await conn.close()


async def test_amqp_message_without_ts_is_stored_once_across_an_outage(
    tmp_path: Path, pg_url: str, amqp_url: str
) -> None:
    await reset_broker(amqp_url)
    [device] = await make_devices(pg_url, 1)
    parts = urlsplit(pg_url)
    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        proxied = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
        env = platform_env(
            tmp_path,
            IIOT_DATABASE_URL=proxied,
            IIOT_AMQP_URL=amqp_url,
            IIOT_COMMIT_TIMEOUT_S="1",
        )
        async with running_platform(env) as platform:
            adapter = next(c for c in platform.components if isinstance(c, AmqpAdapter))
            assert await adapter.wait_connected(15)
            connection = await aio_pika.connect(amqp_url, timeout=10)
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                exchange = await channel.get_exchange("iiot")

                async def send(body: dict[str, object]) -> None:
                    message = aio_pika.Message(
                        json.dumps(body).encode(), headers={"token": device.token}
                    )
                    await exchange.publish(message, f"telemetry.{device.id}")

                await send({"warmup": 1})
                await wait_points(pg_url, 1, 20)
                proxy.refusing = True
                proxy.cut()
                await send({"level": 7})
                # Several commit timeouts pass while the database is unreachable.
                await asyncio.sleep(5)
                proxy.refusing = False
                await wait_points(pg_url, 2, 60)
                for _ in range(50):
                    ready, _ = await queue_state(amqp_url)
                    if ready == 0:
                        break
                    await asyncio.sleep(0.2)
                await asyncio.sleep(3)  # room for a late second copy to land
    assert await _rows(pg_url, "level") == 1
