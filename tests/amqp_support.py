"""Helpers for the AMQP tests: a real aio-pika publisher, broker inspection, PostgreSQL checks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from uuid import UUID

import aio_pika
import aiormq
import asyncpg

from iiot.security import hash_token, new_device_token
from iiot.storage import open_store

EXCHANGE = "iiot"
QUEUE = "telemetry"
REJECTED = "telemetry.rejected"
BASE_TS = 1_767_225_600_000  # 2026-01-01, far from "now" so receipt-time points can't collide


@dataclass(frozen=True, slots=True)
class TestDevice:
    """A device created for a test, with its token."""

    __test__ = False  # not a pytest test class

    id: UUID
    name: str
    token: str


async def make_devices(db_url: str, count: int, tenant: str = "acme") -> list[TestDevice]:
    """Create a tenant and `count` devices straight in the database (migrating it first)."""
    store = open_store(db_url)
    async with store:
        owner = await store.create_tenant(tenant)
        devices = []
        for i in range(count):
            token = new_device_token()
            device = await store.create_device(owner.id, f"dev-{i:05d}", hash_token(token))
            devices.append(TestDevice(device.id, device.name, token))
    return devices


async def reset_broker(url: str) -> None:
    """Delete the platform's queues and exchange so that each test starts empty."""
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        for name in (QUEUE, REJECTED):
            channel = await connection.channel()
            with contextlib.suppress(aiormq.exceptions.ChannelClosed):
                await channel.queue_delete(name)
        channel = await connection.channel()
        with contextlib.suppress(aiormq.exceptions.ChannelClosed):
            await channel.exchange_delete(EXCHANGE)


async def queue_state(url: str, name: str = QUEUE) -> tuple[int, int]:
    """(ready messages, consumers) of a queue, by a passive declare."""
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        result = queue.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)


def message_body(seq: int) -> bytes:
    """Telemetry with 3 points at an explicit timestamp derived from the sequence number."""
    return json.dumps(
        {"ts": BASE_TS + seq, "values": {"temperature": seq * 0.5, "count": seq, "ok": True}}
    ).encode()


async def publish_telemetry(
    url: str,
    devices: Sequence[TestDevice],
    count: int,
    start: int = 0,
    window: int = 500,
    retry_s: float = 0.0,
) -> int:
    """Publish `count` persistent messages round-robin over the devices, with confirms.

    With `retry_s`, behaves like an at-least-once device gateway: when the broker connection
    breaks, it reconnects and publishes the unconfirmed window again (for up to `retry_s`).
    Returns how many times it had to reconnect.
    """
    seq = start
    end = start + count
    reconnects = 0
    deadline = time.monotonic() + retry_s
    while True:
        try:
            connection = await aio_pika.connect(url, timeout=10)
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                exchange = await channel.declare_exchange(
                    EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
                )
                # The queue may not exist yet when the platform is not running: declare it
                # (as the platform does) so that nothing published is dropped as unroutable.
                queue = await channel.declare_queue(QUEUE, durable=True)
                await queue.bind(exchange, "telemetry.*")
                while seq < end:
                    sends = []
                    for n in range(seq, min(seq + window, end)):
                        device = devices[n % len(devices)]
                        message = aio_pika.Message(
                            message_body(n),
                            headers={"token": device.token},
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        )
                        sends.append(
                            exchange.publish(message, f"telemetry.{device.id}", timeout=30)
                        )
                    await asyncio.gather(*sends)
                    seq = min(seq + window, end)
            return reconnects
        except (aiormq.exceptions.AMQPError, ConnectionError, OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            reconnects += 1
            await asyncio.sleep(0.5)


async def stored_points(db_url: str) -> list[tuple[UUID, str, int]]:
    """Every (device, key, ts) row of the telemetry table."""
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT device_id, key, ts FROM telemetry")
    finally:
        await conn.close()
    return [(r["device_id"], r["key"], r["ts"]) for r in rows]


async def count_points(db_url: str) -> int:
    """How many telemetry rows are stored."""
    conn = await asyncpg.connect(db_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM telemetry"))
    finally:
        await conn.close()


def expected_points(devices: Sequence[TestDevice], count: int) -> set[tuple[UUID, str, int]]:
    """The (device, key, ts) of every point `publish_telemetry` sent for `count` messages."""
    return {
        (devices[seq % len(devices)].id, key, BASE_TS + seq)
        for seq in range(count)
        for key in ("temperature", "count", "ok")
    }


def assert_exactly_once(rows: list[tuple[UUID, str, int]], expected: set[tuple[UUID, str, int]]):
    """Every expected point is stored, once, and nothing else is."""
    assert len(rows) == len(set(rows)), "duplicate rows"
    missing = expected - set(rows)
    extra = set(rows) - expected
    assert not missing, f"{len(missing)} points lost, e.g. {sorted(missing)[:3]}"
    assert not extra, f"{len(extra)} unexpected points, e.g. {sorted(extra)[:3]}"


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout_s: float, what: str, interval_s: float = 0.2
) -> None:
    """Poll `check` until it is true; fail with `what` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def wait_points(db_url: str, at_least: int, timeout_s: float) -> None:
    """Wait until at least this many telemetry rows are stored."""

    async def check() -> bool:
        return await count_points(db_url) >= at_least

    await wait_for(check, timeout_s, f"{at_least} stored points")


async def wait_drained(url: str, db_url: str, points: int, timeout_s: float) -> None:
    """Wait until all points are stored and the queue holds nothing ready."""

    async def check() -> bool:
        ready, _ = await queue_state(url)
        return ready == 0 and await count_points(db_url) >= points

    await wait_for(check, timeout_s, f"{points} points stored and queue drained", 0.5)


async def wait_consumers(url: str, consumers: int, timeout_s: float) -> None:
    """Wait until the telemetry queue has exactly this many consumers."""

    async def check() -> bool:
        _, found = await queue_state(url)
        return found == consumers

    await wait_for(check, timeout_s, f"{consumers} consumer(s) on {QUEUE!r}")


async def get_rejected(
    url: str, expected: int, timeout_s: float = 15.0
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take `expected` messages from telemetry.rejected (fails if fewer arrive in time)."""
    connection = await aio_pika.connect(url, timeout=10)
    found: list[aio_pika.abc.AbstractIncomingMessage] = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(REJECTED, durable=True)
        deadline = time.monotonic() + timeout_s
        while len(found) < expected and time.monotonic() < deadline:
            message = await queue.get(fail=False, no_ack=True)
            if message is None:
                await asyncio.sleep(0.1)
                continue
            found.append(message)
    return found
