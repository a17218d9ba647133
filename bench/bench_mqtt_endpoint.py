"""The embedded MQTT endpoint: throughput, idle connections, latency (not a test).

    .venv/bin/python -m bench.bench_mqtt_endpoint [--quick] [--json PATH]

The platform runs in this process as users run it (every protocol on, free ports); each
path gets its own 1,000 devices, which have each sent one message before the timed bursts.
Figures (one run, the same PostgreSQL):
  a) 1,000 concurrent device connections publish QoS 1 messages of 3 points (explicit ts)
     into PostgreSQL, timed from the first publish to the last point stored, three ways:
     - the embedded endpoint (devices log in with id + token, PUBACK after commit);
     - a private Mosquitto + the platform's subscriber (`IIOT_MQTT_URL`);
     - the amqtt 0.12 broker the platform embedded before (bench-only baseline,
       `bench/amqtt_baseline.py`).
     Goal: embedded >= 1.0x the Mosquitto path and >= 5x amqtt.
     The load generator is 2 processes of asyncio raw-socket clients writing pre-encoded
     PUBLISH packets, each connection with up to 50 awaiting PUBACK.
  b) 10,000 idle connections (keep-alive 60 s) held by the embedded endpoint: resident
     memory of the platform process per connection (goal <= 20 KiB).
  c) publish-to-PUBACK latency p50/p99 at half the embedded endpoint's rate from a).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.figures import throughput
from bench.pg import temporary_database
from bench.profiles import platform_ports

BASE_TS = 1_767_225_600_000
PROCESSES = 2
WINDOW = 50
IDLE_HOLD_S = 45.0  # each idle connection stays this long
AMQTT_LIMIT_S = 90.0
_IDS = itertools.count()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _payload(seq: int) -> bytes:
    values = {"temperature": seq * 0.5, "pressure": seq, "running": seq % 2 == 0}
    return json.dumps({"ts": BASE_TS + seq, "values": values}).encode()


# --- load generator (child processes) ---------------------------------------------------------
async def _device(
    port: int,
    device: tuple[str, str] | None,
    topic: str,
    seqs: range,
    hold_s: float,
    interval_s: float,
    latencies: list[float],
) -> None:
    from iiot.adapters import mqtt_codec as mc

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    username, password = device if device else (None, None)
    writer.write(
        mc.encode_connect(
            mc.Connect(
                mc.V311,
                f"b-{os.getpid()}-{next(_IDS)}",
                keepalive=60,
                username=username,
                password=password.encode() if password else None,
            )
        )
    )
    ack = await reader.readexactly(4)
    if ack[3] != 0:
        raise RuntimeError(f"CONNACK {ack[3]}")
    if hold_s:
        await asyncio.sleep(hold_s)
        writer.close()
        return
    packets = [
        mc.encode_publish(mc.V311, topic, _payload(seq), 1, index % 65535 + 1)
        for index, seq in enumerate(seqs)
    ]
    sent = acked = 0
    sent_at: dict[int, float] = {}
    while acked < len(packets):
        if sent < len(packets) and sent - acked < WINDOW:
            if interval_s:
                sent_at[sent % 65535 + 1] = time.perf_counter()
                writer.write(packets[sent])
                sent += 1
                await asyncio.sleep(interval_s)
                while True:  # collect PUBACKs without blocking the pace
                    try:
                        data = await asyncio.wait_for(reader.readexactly(4), 0.0001)
                    except TimeoutError:
                        break
                    pid = int.from_bytes(data[2:4], "big")
                    latencies.append(time.perf_counter() - sent_at.pop(pid))
                    acked += 1
                continue
            chunk = packets[sent : sent + WINDOW - (sent - acked)]
            writer.write(b"".join(chunk))
            sent += len(chunk)
            continue
        data = await reader.readexactly(4)
        if interval_s:
            pid = int.from_bytes(data[2:4], "big")
            latencies.append(time.perf_counter() - sent_at.pop(pid))
        acked += 1
    writer.write(b"\xe0\x00")
    writer.close()


def _generator(
    port: int,
    devices: list[tuple[str, str] | None],
    topics: list[str],
    per_device: int,
    hold_s: float,
    rate: float,
    deadline_s: float,
    out: Any,
) -> None:
    """A load generator process: one connection per device; gives up after `deadline_s`
    (a broker that stops acknowledging must not hang the benchmark)."""
    latencies: list[float] = []

    async def main() -> None:
        interval = len(devices) / rate if rate else 0.0
        tasks = [
            _device(
                port,
                device,
                topics[i],
                range(i * per_device, (i + 1) * per_device),
                hold_s,
                interval,
                latencies,
            )
            for i, device in enumerate(devices)
        ]
        await asyncio.wait_for(asyncio.gather(*tasks), deadline_s)

    with contextlib.suppress(TimeoutError):
        asyncio.run(main())
    out.put(latencies)


def _run_load(
    port: int,
    devices: list[tuple[str, str] | None],
    topics: list[str],
    per_device: int,
    hold_s: float = 0.0,
    rate: float = 0.0,
    deadline_s: float = 300.0,
) -> list[float]:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    share = len(devices) // PROCESSES
    procs = [
        context.Process(
            target=_generator,
            args=(
                port,
                devices[i * share : (i + 1) * share],
                topics[i * share : (i + 1) * share],
                per_device,
                hold_s,
                rate / PROCESSES,
                deadline_s,
                out,
            ),
        )
        for i in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    latencies: list[float] = []
    for _ in procs:
        latencies += out.get(timeout=deadline_s + 60)
    for proc in procs:
        proc.join(60)
    return latencies


# --- the platform side ------------------------------------------------------------------------
def _env(db_url: str, workdir: Path, **extra: str) -> dict[str, str]:
    """The platform as users run it (every protocol on, free ports), `extra` on top."""
    return {
        **platform_ports("defaults"),
        "IIOT_DATA_DIR": str(workdir / "data"),
        "IIOT_DATABASE_URL": db_url,
        "IIOT_ADMIN_PASSWORD": "bench-password",
        "IIOT_BCRYPT_ROUNDS": "4",
        "IIOT_LOG_LEVEL": "WARNING",
        **extra,
    }


async def _reset(db_url: str) -> None:
    """Empty the points; the series (latest values) stay, as on a running platform."""
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("TRUNCATE telemetry")
    finally:
        await conn.close()


async def _wait_rows(db_url: str, expected: int, timeout_s: float = 300) -> int:
    conn = await asyncpg.connect(db_url)
    try:
        deadline = time.monotonic() + timeout_s
        rows = 0
        while time.monotonic() < deadline:
            rows = int(await conn.fetchval("SELECT count(*) FROM telemetry"))
            if rows >= expected:
                break
            await asyncio.sleep(0.02)
        return rows
    finally:
        await conn.close()


async def _devices(platform: Any, count: int) -> list[tuple[str, str]]:
    services = platform.services
    tenant = await services.store.create_tenant(f"bench-{time.monotonic_ns()}")
    made, devices = [], []
    for index in range(count):
        device, token = await services.registry.create_device(tenant.id, f"d{index}")
        made.append((str(device.id), token))
        devices.append(device)
    # One message each first, as from a fleet that has reported before: the timed bursts
    # measure steady ingestion, not the one-time creation of each new series (its latest
    # value row, its OPC UA variable).
    await asyncio.gather(
        *(services.ingestor.ingest(device, _payload(-1), "bench") for device in devices)
    )
    return made


async def _timed(
    db_url: str,
    port: int,
    devices: list[Any],
    ids: list[str],
    per: int,
    timeout_s: float = 240,
    complete: bool = True,
) -> tuple[float, int]:
    """Points/s from the first publish to the last point stored, and the points stored;
    with `complete` False, what was stored within `timeout_s` counts (no error)."""
    await _reset(db_url)
    topics = [f"devices/{device_id}/telemetry" for device_id in ids]
    expected = len(devices) // PROCESSES * PROCESSES * per * 3
    started = time.perf_counter()
    load = asyncio.create_task(
        asyncio.to_thread(_run_load, port, devices, topics, per, deadline_s=timeout_s)
    )
    rows = await _wait_rows(db_url, expected, timeout_s)
    elapsed = time.perf_counter() - started
    await load
    if rows != expected and complete:
        raise RuntimeError(f"stored {rows} points, expected {expected}")
    return rows / elapsed, rows


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _embedded(db_url: str, workdir: Path, connections: int, per: int, idle: int) -> dict:
    from iiot.app import Platform
    from iiot.config import load_settings

    port = _free_port()
    env = _env(db_url, workdir, IIOT_MQTT_PORT=str(port))
    async with Platform(load_settings(env)) as platform:
        devices = await _devices(platform, connections)
        ids = [device_id for device_id, _ in devices]
        # Idle connections first (before the heap grows with the throughput run): resident
        # memory per connection of this (the platform's) process.
        before = _rss_kib()
        idle_devices = [devices[i % len(devices)] for i in range(idle)]
        idle_topics = ["" for _ in range(idle)]
        hold = asyncio.create_task(
            asyncio.to_thread(_run_load, port, idle_devices, idle_topics, 0, IDLE_HOLD_S)
        )
        server = next(c for c in platform.components if c.name == "mqtt")
        deadline = time.monotonic() + IDLE_HOLD_S - 5  # while each idle connection stays
        while len(server.by_client_id) < idle // PROCESSES * PROCESSES:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(server.by_client_id)} idle connections held")
            await asyncio.sleep(0.2)
        held = len(server.by_client_id)
        after = _rss_kib()
        await hold
        rate, _ = await _timed(db_url, port, list(devices), ids, per)
        # Latency at half the rate (messages/s), fewer messages.
        await _reset(db_url)
        half = rate / 3 / 2
        topics = [f"devices/{device_id}/telemetry" for device_id in ids[:100]]
        paced_per = max(10, int(half * 5 / 100))
        latencies = await asyncio.to_thread(
            _run_load, port, list(devices[:100]), topics, paced_per, 0.0, half
        )
        latencies.sort()
    return {
        "rate": rate,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "latency_rate": half,
        "latency_messages": len(latencies),
        "held": held,
        "kib_per_connection": (after - before) / held,
    }


def _start_mosquitto(config: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


async def _mosquitto(db_url: str, workdir: Path, connections: int, per: int) -> float:
    from iiot.app import Platform
    from iiot.config import load_settings

    port = _free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\n"
        "max_queued_messages 0\nmax_inflight_messages 0\npersistence false\n"
    )
    proc = await asyncio.to_thread(_start_mosquitto, config, port)
    try:
        url = f"mqtt://127.0.0.1:{port}?client_id=iiot-bench-endpoint"
        env = _env(db_url, workdir, IIOT_MQTT_URL=url)
        async with Platform(load_settings(env)) as platform:
            services = platform.services
            while services.health.components["mqtt"].state != "up":  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            devices = await _devices(platform, connections)
            ids = [device_id for device_id, _ in devices]
            anonymous: list[Any] = [None] * len(ids)
            rate, _ = await _timed(db_url, port, anonymous, ids, per)
            return rate
    finally:
        proc.terminate()
        proc.wait(10)


async def _amqtt(db_url: str, workdir: Path, connections: int, per: int) -> tuple[float, int]:
    """amqtt's rate; it has stalled under this load (stopped acknowledging), so what it
    stored within the time limit counts, with the points stored."""
    from bench.amqtt_baseline import EmbeddedBroker
    from iiot.app import Platform
    from iiot.config import load_settings

    port = _free_port()
    env = _env(db_url, workdir, IIOT_MQTT_PORT="0")
    async with Platform(load_settings(env)) as platform:
        services = platform.services
        settings = dataclasses.replace(services.settings, mqtt_port=port)
        broker = EmbeddedBroker(dataclasses.replace(services, settings=settings))
        await broker.__aenter__()
        try:
            devices = await _devices(platform, connections)
            ids = [device_id for device_id, _ in devices]
            return await _timed(
                db_url, port, list(devices), ids, per, timeout_s=AMQTT_LIMIT_S, complete=False
            )
        finally:
            # amqtt's shutdown has hung with messages still in its broadcast queue.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(broker.__aexit__(None, None, None), 10)


async def _run(quick: bool) -> dict[str, Any]:
    connections = 1000
    per = 10 if quick else 100  # a burst long enough that 1,000 CONNECTs do not dominate it
    idle = 2000 if quick else 10_000
    workdir = Path(tempfile.mkdtemp(prefix="iiot-bench-endpoint-"))
    try:
        async with temporary_database() as db_url:
            embedded = await _embedded(db_url, workdir, connections, per, idle)
            mosquitto = await _mosquitto(db_url, workdir, connections, per)
            amqtt, amqtt_stored = await _amqtt(db_url, workdir, connections, per)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rate = embedded["rate"]
    vs_mosquitto, vs_amqtt = rate / mosquitto, rate / max(amqtt, 1e-9)
    expected = connections // PROCESSES * PROCESSES * per * 3
    kib = embedded["kib_per_connection"]
    return {
        "name": "mqtt_endpoint",
        "figures": [
            throughput(
                f"embedded MQTT endpoint, {connections:,} connections, QoS 1 -> PostgreSQL",
                rate,
                "private Mosquitto + the platform's subscriber",
                mosquitto,
            ),
            throughput(
                f"embedded MQTT endpoint, {connections:,} connections, QoS 1 -> PostgreSQL",
                rate,
                "amqtt 0.12 broker (the former embedded broker)",
                amqtt,
            ),
        ],
        "notes": [
            f"{connections:,} connections x {per} messages of 3 points each way, timed from"
            " the first publish to the last point stored; load generator: "
            f"{PROCESSES} asyncio processes, {WINDOW} QoS 1 messages in flight per connection.",
            f"goal embedded >= 1.0x Mosquitto path: {'met' if vs_mosquitto >= 1 else 'NOT met'}"
            f" ({vs_mosquitto:.2f}x); goal >= 5x amqtt: {'met' if vs_amqtt >= 5 else 'NOT met'}"
            f" ({vs_amqtt:.1f}x)",
            f"amqtt stored {amqtt_stored:,} of {expected:,} points"
            + (
                ""
                if amqtt_stored == expected
                else f" before it stalled ({AMQTT_LIMIT_S:.0f} s limit)"
            ),
            f"{embedded['held']:,} idle connections (keep-alive 60 s) held:"
            f" {kib:.1f} KiB resident memory per connection"
            f" (goal <= 20 KiB: {'met' if kib <= 20 else 'NOT met'})",
            f"publish-to-PUBACK at {embedded['latency_rate']:,.0f} msg/s (half the rate above),"
            f" {embedded['latency_messages']:,} messages over 100 connections:"
            f" p50 {embedded['p50_ms']:.1f} ms, p99 {embedded['p99_ms']:.1f} ms",
        ],
        "params": {"connections": connections, "messages_per_connection": per, "idle": idle},
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Run the benchmark and return its figures."""
    from iiot.runtime import tune_garbage_collector

    tune_garbage_collector()
    return asyncio.run(_run(quick))


def main() -> None:
    """Print the figures (and write them to --json PATH)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.quick)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
