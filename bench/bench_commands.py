"""Commands: REST -> device -> reply -> REST round trip, queued delivery to many devices on
connect, and MQTT ingestion with commands flowing against without (same run).

The platform runs as `iiot run` runs by default (every protocol on, each on a free port) on
a throwaway PostgreSQL database. Devices answer commands three ways:
- paho (MQTT 5) on the platform's own MQTT endpoint, our topics: the round trip the issue's
  goal is about (p99 < 50 ms at 100 commands/s);
- the HTTP long poll (`GET /api/v1/{token}/rpc`, httpx);
- paho on a private Mosquitto (the external-broker path, `IIOT_MQTT_URL`), when installed.
Ingest load comes from raw-socket MQTT publisher processes (bench_mqtt_endpoint's load
generator), so the commands' client work does not share their CPU. The REST calls and the
long polls of the timed phases go through a lean keep-alive client (`bench.rest_client`):
with httpx this process spent ~3 ms of CPU per command (0.8-1 ms now), on the cores the
platform is measured on. Each timed phase starts once the platform is idle after the
set-up (`settled`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from bench.bench_mqtt_endpoint import PROCESSES, _reset, _run_load, _wait_rows
from bench.figures import throughput
from bench.pg import temporary_database
from bench.profiles import die_with_parent, free_port, platform_ports, settled
from bench.rest_client import RestConnections

ANSWERING_DEVICES = 20  # per device-side form
ADMIN_PASSWORD = "bench-admin-password"
RATE = 100  # commands/s


def platform_env(url: str, ports: dict[str, str], data: Path) -> dict[str, str]:
    """The environment of `iiot run` as users run it, on this database and data directory,
    with an `admin` login."""
    return {
        **os.environ,
        **ports,
        "IIOT_DATA_DIR": str(data),
        "IIOT_DATABASE_URL": url,
        "IIOT_ADMIN_USERNAME": "admin",
        "IIOT_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "IIOT_BCRYPT_ROUNDS": "4",
        "IIOT_LOG_LEVEL": "WARNING",
    }


def start_platform(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`iiot run` in a child process that dies with this one."""
    return subprocess.Popen(
        [sys.executable, "-m", "iiot", "run"], env=env, preexec_fn=die_with_parent
    )


async def _wait_ready(port: int) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError("platform did not start")


@contextlib.asynccontextmanager
async def admin_client(
    http_port: int, connections: int = 100
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    """Once the platform is ready: an HTTP client of its API and the admin's headers."""
    await _wait_ready(http_port)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{http_port}",
        timeout=60,
        limits=httpx.Limits(max_connections=connections),
    ) as client:
        yield client, await _login(client)


async def _login(client: httpx.AsyncClient) -> dict[str, str]:
    login = await client.post(
        "/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
    )
    return {"Authorization": f"Bearer {login.json()['access_token']}"}


async def _devices(
    client: httpx.AsyncClient, admin: dict[str, str], n: int
) -> list[dict[str, Any]]:
    tenant = (await client.post("/api/tenants", json={"name": "bench"}, headers=admin)).json()
    sem = asyncio.Semaphore(20)

    async def one(i: int) -> dict[str, Any]:
        async with sem:
            answer = await client.post(
                "/api/devices", json={"name": f"d{i}", "tenant_id": tenant["id"]}, headers=admin
            )
            result: dict[str, Any] = answer.json()
            return result

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def _answering(client: httpx.AsyncClient, token: str, stop: asyncio.Event) -> None:
    while not stop.is_set():
        poll = await client.get(f"/api/v1/{token}/rpc", params={"timeout": 1000})
        if poll.status_code == 200:
            command = poll.json()
            await client.post(f"/api/v1/{token}/rpc/{command['id']}", json={"ok": True})


async def _round_trips(
    http_port: int,
    admin: dict[str, str],
    devices: list[dict[str, Any]],
    until: asyncio.Future[Any] | float,
) -> list[float]:
    """Two-way commands at RATE/s, round robin over the devices, for `until` seconds or
    until the future is done; the latencies (ms) of those answered 200. Sent with the lean
    client (`bench.rest_client`): this process shares the cores with the platform."""
    latencies: list[float] = []
    refused: dict[int, int] = {}
    tasks = []
    rest = RestConnections("127.0.0.1", http_port, admin)
    await rest.warm(10)  # a round trip lasts ~10 ms: about one request in flight at a time

    async def one(device: dict[str, Any]) -> None:
        start = time.perf_counter()
        status, _ = await rest.post(f"/api/devices/{device['id']}/commands", {"method": "ping"})
        if status == 200:
            latencies.append((time.perf_counter() - start) * 1000)
        else:
            refused[status] = refused.get(status, 0) + 1

    started = time.perf_counter()
    try:
        for i in range(10**9):
            if isinstance(until, float) and time.perf_counter() - started >= until:
                break
            if isinstance(until, asyncio.Future) and until.done():
                break
            tasks.append(asyncio.create_task(one(devices[i % len(devices)])))
            # Paced from the start, so a slow answer does not lower the rate.
            await asyncio.sleep(max(0.0, started + (i + 1) / RATE - time.perf_counter()))
        await asyncio.gather(*tasks)
    finally:
        await rest.close()
    print(f"{len(latencies)} answered 200, others: {refused}", file=sys.stderr)
    return latencies


def _percentiles(latencies: list[float]) -> tuple[float | None, float | None]:
    if len(latencies) < 100:
        return None, None
    return statistics.median(latencies), statistics.quantiles(latencies, n=100)[98]


def _latency_figures(what: str, latencies: list[float], goal: bool) -> list[dict[str, Any]]:
    p50, p99 = _percentiles(latencies)
    suffix = "; goal < 50 ms" if goal else ""
    return [
        {"label": f"command round trip p50 ({what})", "value": p50, "unit": "ms"},
        {"label": f"command round trip p99 ({what}{suffix})", "value": p99, "unit": "ms"},
    ]


def _paho_devices(port: int, devices: list[dict[str, Any]], *, logins: bool) -> list[Any]:
    """Paho clients answering every command of these devices (our topics): one MQTT 5
    connection per device logged in with id + token on the platform's endpoint, or one
    anonymous connection for all of them on an external broker."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    def on_message(c: Any, userdata: Any, message: Any) -> None:
        c.publish(message.topic + "/reply", b'{"ok": true}', qos=1)

    groups = [[d] for d in devices] if logins else [devices]
    clients = []
    for index, group in enumerate(groups):
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"bench-dev-{index}",
            protocol=paho.MQTTv5,
        )
        if logins:
            client.username_pw_set(group[0]["id"], group[0]["token"])
        subscribed = threading.Event()
        client.on_message = on_message
        client.on_subscribe = lambda *args, done=subscribed: done.set()
        client.connect("127.0.0.1", port)
        client.loop_start()
        client.subscribe([(f"devices/{d['id']}/commands/+", 1) for d in group])
        if not subscribed.wait(10):
            raise RuntimeError("a device's subscription was not acknowledged")
        clients.append(client)
    return clients


def _stop_paho(clients: list[Any]) -> None:
    for client in clients:
        client.disconnect()
        client.loop_stop()


async def _ingest(db_url: str, mqtt_port: int, publishers: list[dict[str, Any]], per: int) -> float:
    """Points/s of a QoS 1 burst from the publisher processes, first publish to last
    point stored."""
    await _reset(db_url)
    logins = [(d["id"], d["token"]) for d in publishers]
    topics = [f"devices/{d['id']}/telemetry" for d in publishers]
    expected = len(publishers) // PROCESSES * PROCESSES * per * 3
    started = time.perf_counter()
    load = asyncio.create_task(asyncio.to_thread(_run_load, mqtt_port, logins, topics, per))
    rows = await _wait_rows(db_url, expected)
    elapsed = time.perf_counter() - started
    await load
    if rows != expected:
        raise RuntimeError(f"stored {rows} points, expected {expected}")
    return expected / elapsed


async def _ingest_with_commands(
    db_url: str,
    mqtt_port: int,
    publishers: list[dict[str, Any]],
    per: int,
    http_port: int,
    admin: dict[str, str],
    answering: list[dict[str, Any]],
) -> tuple[float, list[float]]:
    ingest = asyncio.ensure_future(_ingest(db_url, mqtt_port, publishers, per))
    latencies = await _round_trips(http_port, admin, answering, ingest)
    return await ingest, latencies


async def _run(quick: bool) -> dict[str, Any]:
    seconds = 3.0 if quick else 10.0
    offline_count = 200 if quick else 1000
    publisher_count, per = (200, 50) if quick else (500, 120)
    async with temporary_database() as url:
        ports = platform_ports("defaults")
        http_port = int(ports["IIOT_HTTP_PORT"])
        mqtt_port = int(ports["IIOT_MQTT_PORT"])
        data = Path(tempfile.mkdtemp(prefix="iiot-bench-commands-"))
        env = platform_env(url, ports, data)
        proc = start_platform(env)
        try:
            async with admin_client(http_port, connections=offline_count + 200) as (
                client,
                admin,
            ):
                devices = await _devices(
                    client, admin, 2 * ANSWERING_DEVICES + publisher_count + offline_count
                )
                mqtt_devices = devices[:ANSWERING_DEVICES]
                http_devices = devices[ANSWERING_DEVICES : 2 * ANSWERING_DEVICES]
                publishers = devices[2 * ANSWERING_DEVICES : -offline_count]
                offline = devices[-offline_count:]

                # The round trips, each form alone.
                paho_clients = await asyncio.to_thread(
                    _paho_devices, mqtt_port, mqtt_devices, logins=True
                )
                try:
                    await settled(proc.pid)
                    embedded = await _round_trips(http_port, admin, mqtt_devices, seconds)
                    # Ingest without and with commands flowing, alternated, best of each,
                    # after one burst that makes every series (its latest-value row, its
                    # OPC UA variable): the first burst of a run is slower for that alone.
                    await _ingest(url, mqtt_port, publishers, per)
                    without: list[float] = []
                    with_commands: list[float] = []
                    under_load: list[float] = []
                    for _ in range(1 if quick else 3):
                        without.append(await _ingest(url, mqtt_port, publishers, per))
                        rate, latencies = await _ingest_with_commands(
                            url, mqtt_port, publishers, per, http_port, admin, mqtt_devices
                        )
                        with_commands.append(rate)
                        under_load += latencies
                finally:
                    await asyncio.to_thread(_stop_paho, paho_clients)

                stop = asyncio.Event()
                pollers = [
                    asyncio.create_task(_answering(client, d["token"], stop)) for d in http_devices
                ]
                await asyncio.sleep(0.5)
                long_poll = await _round_trips(http_port, admin, http_devices, seconds)
                stop.set()
                await asyncio.gather(*pollers)

                # Persistent commands for offline devices, then every device connects.
                sem = asyncio.Semaphore(50)

                async def queue(device: dict[str, Any]) -> None:
                    async with sem:
                        await client.post(
                            f"/api/devices/{device['id']}/commands",
                            json={"method": "wake", "persistent": True, "oneway": True},
                            headers=admin,
                        )

                await asyncio.gather(*(queue(d) for d in offline))
                # Each device on its own connection, as devices are.
                pollers = [RestConnections("127.0.0.1", http_port, {}) for _ in offline]
                start = time.perf_counter()
                polls = await asyncio.gather(
                    *(
                        rest.get(f"/api/v1/{d['token']}/rpc?timeout=30000")
                        for rest, d in zip(pollers, offline, strict=True)
                    )
                )
                drained_s = time.perf_counter() - start
                delivered = sum(1 for status, _ in polls if status == 200)
                await asyncio.gather(*(rest.close() for rest in pollers))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        external = await _external_broker(env, data, http_port, mqtt_devices, seconds)
    return {
        "name": "commands",
        "figures": [
            *_latency_figures("paho MQTT 5 device on the embedded endpoint", embedded, True),
            *_latency_figures("the same, during the ingest burst below", under_load, False),
            *_latency_figures("HTTP long poll device", long_poll, False),
            *(_latency_figures("paho via external Mosquitto", external, False) if external else []),
            {
                "label": f"{len(offline)} queued commands delivered after connect (goal < 5 s)",
                "value": round(drained_s, 3),
                "unit": "s",
                "kind": "latency",
            },
            throughput(
                f"MQTT ingest with {RATE} commands/s flowing",
                max(with_commands),
                "the same ingest without commands",
                max(without),
            ),
        ],
        "notes": [
            f"{len(embedded)} embedded-endpoint round trips answered 200 in {seconds:.0f} s;"
            f" {delivered}/{len(offline)} queued commands delivered (HTTP long polls)",
            f"ingest: {len(publishers)} raw-socket MQTT connections x {per} QoS 1 messages of"
            f" 3 points from {PROCESSES} processes, first publish to last point stored; a"
            f" first burst makes every series, then runs alternated without/with, best of"
            f" each: without {[round(r) for r in without]},"
            f" with {[round(r) for r in with_commands]} points/s",
            "goals: p99 < 50 ms, queued delivery < 5 s, ingest ratio >= 0.9",
        ],
        "params": {"seconds": seconds, "rate": RATE, "offline_devices": offline_count},
    }


async def _external_broker(
    env: dict[str, str],
    data: Path,
    http_port: int,
    mqtt_devices: list[dict[str, Any]],
    seconds: float,
) -> list[float]:
    """The same platform again, reaching devices through a private Mosquitto (every
    device gets a link through it, so it runs apart from the phases above)."""
    if shutil.which("mosquitto") is None:
        return []
    from bench.bench_mqtt import _Mosquitto

    broker = _Mosquitto(data)
    env = {
        **env,
        "IIOT_MQTT_URL": f"mqtt://127.0.0.1:{broker.port}?client_id=iiot-bench-commands",
        "IIOT_MQTT_PORT": str(free_port()),
    }
    proc = start_platform(env)
    try:
        async with admin_client(http_port) as (_, admin):
            clients = await asyncio.to_thread(
                _paho_devices, broker.port, mqtt_devices, logins=False
            )
            await asyncio.sleep(1.0)  # the platform's broker session is up
            await settled(proc.pid)
            try:
                return await _round_trips(http_port, admin, mqtt_devices, seconds)
            finally:
                await asyncio.to_thread(_stop_paho, clients)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        broker.stop()


def run(quick: bool = False) -> dict[str, Any]:
    """Run the benchmark (about two minutes; under a minute with `quick`)."""
    return asyncio.run(_run(quick))


def main() -> None:
    """Print the result; `--json PATH` also writes it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.quick)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
