"""AMQP ingestion throughput: RabbitMQ -> platform -> PostgreSQL, beside two baselines.

All in one run, on loopback, against the local RabbitMQ and PostgreSQL:
1. a throwaway PostgreSQL database `iiot_bench_amqp_<pid>` with 1,000 devices;
2. raw COPY limit: the same rows COPYed straight into `telemetry` (one connection, large
   transactions, no broker, no parsing): the most the database takes;
3. the platform end to end: N persistent messages (3 points each, 1,000 devices, real
   tokens) are queued in `telemetry` first, then the platform is started and timed from
   the end of its start-up until every point is committed (points stored during start-up
   are left out of the count; acknowledged after commit, as in production);
4. a naive consumer: aio-pika, one message at a time, one INSERT transaction per message,
   then basic.ack — what a first attempt usually looks like;
5. a bare consumer: aiormq (the platform's client library) reading the same messages and
   acknowledging them many at once, doing nothing else: the most any consumer built on
   that library can drain here.

6. the broker's ceiling: a C consumer (bench/amqp_c_consumer.c, librabbitmq, built here
   with gcc; prefetch 2,000, acks 500 at a time, no other work);
7. `iiot run --role ingest --workers 1` and `2`: competing consumers of the one queue.
The platform runs as users run it (every protocol on, on free ports), and again with
OPC UA off.

Goals: end to end >= 40 % of the COPY limit; >= 0.5 of the C consumer and >= 20 x the
naive consumer (best of one process and the worker groups).
The broker's `iiot`/`telemetry` names are the platform's own; they are deleted before and
after, so do not run this beside the AMQP tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import aio_pika
import aiormq
import asyncpg

from bench.figures import throughput
from bench.profiles import PROFILE_LABELS, drain_rate, platform_ports, worker_group
from iiot.app import Platform
from iiot.config import load_settings
from iiot.model import DevicePoints, Point
from iiot.security import hash_token, new_device_token
from iiot.storage import open_store

__all__ = ["main", "run"]

ADMIN_URL = os.environ.get("IIOT_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("IIOT_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DEVICES = 1_000
KEYS = ("temperature", "pressure", "running")
BASE_TS = 1_767_225_600_000
EXCHANGE, QUEUE, REJECTED = "iiot", "telemetry", "telemetry.rejected"


def _db_url(name: str) -> str:
    parts = urlsplit(ADMIN_URL)
    return urlunsplit(parts._replace(path="/" + name))


_KEYS = ("temperature", "pressure", "running")  # the keys of every message (`_body`)


def _body(seq: int) -> bytes:
    return json.dumps(
        {
            "ts": BASE_TS + seq // DEVICES,
            "values": {"temperature": 20 + seq % 100 / 10, "pressure": seq % 7, "running": True},
        }
    ).encode()


def _rows(devices: list[tuple[UUID, str]], messages: int) -> list[tuple[Any, ...]]:
    """The telemetry rows the messages carry (num/int/bool columns as the store writes them)."""
    rows = []
    for seq in range(messages):
        device_id = devices[seq % DEVICES][0]
        ts = BASE_TS + seq // DEVICES
        rows.append((device_id, "temperature", ts, 20 + seq % 100 / 10, None, None, None))
        rows.append((device_id, "pressure", ts, None, seq % 7, None, None))
        rows.append((device_id, "running", ts, None, None, True, None))
    return rows


async def _make_devices(db_url: str) -> list[tuple[UUID, str]]:
    store = open_store(db_url)
    async with store:
        tenant = await store.create_tenant("bench")
        devices, made = [], []
        for i in range(DEVICES):
            token = new_device_token()
            device = await store.create_device(tenant.id, f"dev-{i:04d}", hash_token(token))
            devices.append((device.id, token))
            made.append(device)
        # The fleet has reported before, as a running platform's has: each device's series
        # exist (their latest values; the OPC UA address space is built from them at start),
        # so a drain measures steady ingestion, not the one-time creation of new series.
        await store.write_points(
            [
                DevicePoints(device, tuple(Point(k, BASE_TS - 1, 0.0) for k in _KEYS))
                for device in made
            ]
        )
    return devices


async def _reset_broker() -> None:
    connection = await aio_pika.connect(AMQP_URL, timeout=10)
    async with connection:
        for name in (QUEUE, REJECTED):
            channel = await connection.channel()
            try:
                await channel.queue_delete(name)
            except aiormq.exceptions.ChannelClosed:
                continue
        channel = await connection.channel()
        with contextlib.suppress(aiormq.exceptions.ChannelClosed):
            await channel.exchange_delete(EXCHANGE)


async def _publish(devices: list[tuple[UUID, str]], messages: int, offset: int = 0) -> None:
    """Queue persistent messages (with publisher confirms) before anybody consumes."""
    connection = await aio_pika.connect(AMQP_URL, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(QUEUE, durable=True)
        await queue.bind(exchange, "telemetry.*")
        window = 2_000
        for start in range(offset, offset + messages, window):
            sends = []
            for seq in range(start, min(start + window, offset + messages)):
                device_id, token = devices[seq % DEVICES]
                message = aio_pika.Message(
                    _body(seq),
                    headers={"token": token},
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                sends.append(exchange.publish(message, f"telemetry.{device_id}", timeout=60))
            await asyncio.gather(*sends)


async def _truncate(db_url: str) -> None:
    """Empty the points; the series (latest values) stay, as after a restart."""
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("TRUNCATE telemetry")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def _copy_limit(db_url: str, rows: list[tuple[Any, ...]]) -> float:
    """Points/s of plain COPY into the telemetry table, 15,000 rows per transaction."""
    conn = await asyncpg.connect(db_url)
    columns = ("device_id", "key", "ts", "num_value", "int_value", "bool_value", "str_value")
    try:
        started = time.perf_counter()
        for i in range(0, len(rows), 15_000):
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "telemetry", records=rows[i : i + 15_000], columns=columns
                )
        return len(rows) / (time.perf_counter() - started)
    finally:
        await conn.close()


def _env(db_url: str, profile: str = "defaults") -> dict[str, str]:
    """`iiot run` as users run it with AMQP on (every other protocol on a free port)."""
    return {
        **platform_ports(profile),
        "IIOT_DATA_DIR": tempfile.mkdtemp(prefix="iiot-bench-amqp-"),
        "IIOT_DATABASE_URL": db_url,
        "IIOT_AMQP_URL": AMQP_URL,
        "IIOT_ADMIN_PASSWORD": "bench-password",
        "IIOT_BCRYPT_ROUNDS": "4",
        "IIOT_LOG_LEVEL": "WARNING",
    }


async def _workers(
    db_url: str, devices: list[tuple[UUID, str]], messages: int, offset: int, workers: int
) -> float:
    """Points/s of N ingest workers (competing consumers of the queue, the environment of
    `iiot run --role ingest --workers N`) draining `messages` queued first; timed from
    the first commit to the last point."""
    env = _env(db_url)
    log_file = Path(env["IIOT_DATA_DIR"]) / "workers.log"
    await _truncate(db_url)
    await _publish(devices, messages, offset=offset)
    try:
        with worker_group(env, workers, log_file, wait_ready=False):
            return await drain_rate(db_url, 3 * messages, 120)
    finally:
        shutil.rmtree(env["IIOT_DATA_DIR"], ignore_errors=True)


def _build_c_consumer(workdir: Path) -> Path:
    """Compile bench/amqp_c_consumer.c (gcc, librabbitmq from Debian's librabbitmq-dev)."""
    source = Path(__file__).with_name("amqp_c_consumer.c")
    binary = workdir / "amqp_c_consumer"
    built = subprocess.run(
        ["gcc", "-O2", "-o", str(binary), str(source), "-lrabbitmq"],
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0:
        raise RuntimeError(
            "cannot build the C consumer (apt-get install gcc librabbitmq-dev): "
            + built.stderr.strip()[-500:]
        )
    return binary


def _c_consumer(binary: Path, messages: int) -> float:
    """Points/s of the C consumer draining `messages` queued first (3 points each)."""
    url = urlsplit(AMQP_URL)
    vhost = url.path[1:] or "/"
    out = subprocess.run(
        [
            str(binary),
            url.hostname or "127.0.0.1",
            str(url.port or 5672),
            vhost,
            url.username or "guest",
            url.password or "guest",
            QUEUE,
            str(messages),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.split()
    return 3 * int(out[0]) / float(out[1])


async def _platform(
    db_url: str, points: int, profile: str = "defaults"
) -> tuple[float, dict[str, Any]]:
    """Points/s of the platform draining the pre-filled queue into PostgreSQL."""
    env = _env(db_url, profile)
    settings = load_settings(env)
    async with Platform(settings) as platform:
        stored = platform.services.metrics.points_stored.labels("amqp")
        # Timed from the end of start-up (migrations, pools, HTTP...): what was already
        # stored by then is left out of the count, so the figure is the draining rate.
        started, stored_before = time.perf_counter(), stored._value.get()
        deadline = time.monotonic() + 120
        while stored._value.get() < points:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {stored._value.get():.0f} of {points} points stored")
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        batches = platform.services.metrics.batch_points
        samples = {
            s.name: s.value
            for s in batches.collect()[0].samples
            if s.name.endswith(("_sum", "_count"))
        }
    detail = {
        "stored_during_startup": stored_before,
        "batches": samples.get("iiot_batch_points_count"),
        "mean_batch_points": (
            samples["iiot_batch_points_sum"] / samples["iiot_batch_points_count"]
            if samples.get("iiot_batch_points_count")
            else None
        ),
    }
    return (points - stored_before) / elapsed, detail


async def _naive(db_url: str, messages: int) -> float:
    """Points/s of a consumer that inserts and commits each message, then acks it."""
    by_token: dict[str, UUID] = {}
    conn = await asyncpg.connect(db_url)
    connection = await aio_pika.connect(AMQP_URL, timeout=10)
    done = 0
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=100)
        queue = await channel.declare_queue(QUEUE, durable=True)
        started = time.perf_counter()
        async with queue.iterator() as messages_in:
            async for message in messages_in:
                token = str(message.headers["token"])
                device_id = by_token.get(token)
                if device_id is None:
                    device_id = await conn.fetchval(
                        "SELECT id FROM devices WHERE token_hash = $1", hash_token(token)
                    )
                    by_token[token] = device_id
                payload = json.loads(message.body)
                values = payload["values"]
                async with conn.transaction():
                    await conn.executemany(
                        "INSERT INTO telemetry (device_id, key, ts, num_value, int_value,"
                        " bool_value) VALUES ($1, $2, $3, $4, $5, $6)"
                        " ON CONFLICT DO NOTHING",
                        [
                            (
                                device_id,
                                "temperature",
                                payload["ts"],
                                values["temperature"],
                                None,
                                None,
                            ),
                            (device_id, "pressure", payload["ts"], None, values["pressure"], None),
                            (device_id, "running", payload["ts"], None, None, values["running"]),
                        ],
                    )
                await message.ack()
                done += 1
                if done >= messages:
                    break
        return 3 * done / (time.perf_counter() - started)
    finally:
        await connection.close()
        await conn.close()


async def _bare(messages: int, prefetch: int) -> float:
    """Points/s of a consumer that does nothing but read and acknowledge (aiormq, the
    platform's client library, acks of many messages at once): the ceiling for any
    consumer written with it on this machine, before any work on the messages."""
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.basic_qos(prefetch_count=prefetch)
        done = asyncio.Event()
        count = 0

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            nonlocal count
            count += 1
            # Read what the platform reads: the token header and the body.
            _ = (message.header.properties.headers or {}).get("token"), message.body
            if count % 200 == 0 or count == messages:
                await channel.basic_ack(message.delivery_tag, multiple=True)
            if count >= messages:
                done.set()

        started = time.perf_counter()
        await channel.basic_consume(QUEUE, on_message)
        await asyncio.wait_for(done.wait(), 120)
        return 3 * count / (time.perf_counter() - started)
    finally:
        await connection.close()


async def _run(quick: bool) -> dict[str, Any]:
    messages = 20_000 if quick else 40_000
    naive_messages = 1_000 if quick else 3_000
    points = 3 * messages
    name = f"iiot_bench_amqp_{os.getpid()}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    db_url = _db_url(name)
    workdir = Path(tempfile.mkdtemp(prefix="iiot-bench-amqp-c-"))
    offset = 0

    async def queued(count: int) -> None:
        nonlocal offset
        await _publish(devices, count, offset=offset)
        offset += count

    try:
        binary = await asyncio.to_thread(_build_c_consumer, workdir)
        await _reset_broker()
        devices = await _make_devices(db_url)
        rows = _rows(devices, messages)

        await _truncate(db_url)
        copy_rate = await _copy_limit(db_url, rows)
        del rows

        await queued(messages)
        c_rate = await asyncio.to_thread(_c_consumer, binary, messages)

        rates: dict[str, float] = {}
        for profile in ("defaults", "opcua_off"):
            await _truncate(db_url)
            await queued(messages)
            rates[profile], detail = await _platform(db_url, points, profile)
        platform_rate = rates["defaults"]

        by_workers: dict[int, float] = {}
        for workers in (1, 2):
            by_workers[workers] = await _workers(db_url, devices, messages, offset, workers)
            offset += messages

        await _truncate(db_url)
        await queued(naive_messages)
        naive_rate = await _naive(db_url, naive_messages)

        await queued(messages)
        bare_rate = await _bare(messages, load_settings({}).amqp_prefetch)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        await _reset_broker()
        admin = await asyncpg.connect(ADMIN_URL)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

    best = max(platform_rate, *by_workers.values())
    vs_copy = platform_rate / copy_rate
    vs_naive = best / naive_rate
    vs_c = best / c_rate
    label = f"AMQP -> PostgreSQL, {DEVICES} devices, 3 points/message"
    defaults = PROFILE_LABELS["defaults"]
    c_label = "C consumer (librabbitmq, prefetch 2,000, ack per 500): read and ack only"
    return {
        "name": "amqp",
        "figures": [
            throughput(
                f"{label}, {defaults}",
                platform_rate,
                "raw COPY into telemetry (same rows)",
                copy_rate,
            ),
            throughput(
                f"AMQP -> PostgreSQL, {defaults}",
                platform_rate,
                "the same platform with OPC UA off",
                rates["opcua_off"],
            ),
            throughput(f"AMQP -> PostgreSQL, {defaults}", platform_rate, c_label, c_rate),
            throughput(
                "AMQP -> PostgreSQL, 2 ingest workers (competing consumers), first to last commit",
                by_workers[2],
                "the same with 1 ingest process",
                by_workers[1],
            ),
            throughput(
                "AMQP -> PostgreSQL, best of one process, --workers 1 and 2", best, c_label, c_rate
            ),
            throughput(
                "AMQP -> PostgreSQL, best of one process, --workers 1 and 2",
                best,
                "naive consumer (insert + commit per message)",
                naive_rate,
            ),
            throughput(
                f"AMQP -> PostgreSQL, {defaults}",
                platform_rate,
                "bare aiormq consumer: read and ack only, no work",
                bare_rate,
            ),
        ],
        "notes": [
            f"{messages} persistent messages queued first, then drained by the platform "
            "(ack after commit, prefetch 1000), timed from the end of platform start-up "
            "(for worker groups: from the first commit to the last point)",
            f"goal >= 40 % of COPY: {'met' if vs_copy >= 0.4 else 'NOT met'} ({vs_copy:.0%}); "
            f"goal >= 0.5 of the C consumer: {'met' if vs_c >= 0.5 else 'NOT met'} "
            f"({vs_c:.2f}); goal >= 20 x naive: {'met' if vs_naive >= 20 else 'NOT met'} "
            f"({vs_naive:.1f} x)",
            f"workers: 1 -> {by_workers[1]:,.0f}, 2 -> {by_workers[2]:,.0f} points/s "
            f"({by_workers[2] / by_workers[1]:.2f} x); RabbitMQ, PostgreSQL and the workers "
            "share the machine's cores. Figures on a shared machine are noisy: compare the "
            "ratios, each against a baseline of the same run.",
            f"the client library's own ceiling here: a bare aiormq consumer drains"
            f" {bare_rate:,.0f} points/s = {bare_rate / c_rate:.2f} of the C consumer",
        ],
        "params": {
            "messages": messages,
            "naive_messages": naive_messages,
            "devices": DEVICES,
            "profiles": rates,
            "workers": by_workers,
            "c_consumer": c_rate,
        },
        "detail": detail,
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Run the benchmark and return its figures (see bench/README.md)."""
    from iiot.runtime import tune_garbage_collector

    tune_garbage_collector()  # the platform runs here, tuned as `iiot run` tunes it
    return asyncio.run(_run(quick))


def main() -> None:
    """Print the result; `--json PATH` also writes it, `--quick` runs a smaller load."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller load")
    parser.add_argument("--json", type=Path, help="write the result to this file")
    args = parser.parse_args()
    result = run(quick=args.quick)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
