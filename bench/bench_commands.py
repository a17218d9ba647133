"""Commands: REST -> device -> reply -> REST round trip, queued delivery to many devices on
connect, and telemetry ingestion with commands flowing against without (same run).

The device side is the HTTP long poll (`GET /api/v1/{token}/rpc`) with httpx; the platform
runs as `iiot run` on a throwaway PostgreSQL database.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.figures import throughput
from bench.pg import temporary_database

ADMIN_PASSWORD = "bench-admin-password"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _wait_port(port: int) -> None:
    for _ in range(300):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise TimeoutError("platform did not start")


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
    client: httpx.AsyncClient,
    admin: dict[str, str],
    devices: list[dict[str, Any]],
    rate: int,
    seconds: float,
) -> list[float]:
    latencies: list[float] = []
    tasks = []

    async def one(device: dict[str, Any]) -> None:
        start = time.perf_counter()
        answer = await client.post(
            f"/api/devices/{device['id']}/commands", json={"method": "ping"}, headers=admin
        )
        if answer.status_code == 200:
            latencies.append((time.perf_counter() - start) * 1000)

    for i in range(int(rate * seconds)):
        tasks.append(asyncio.create_task(one(devices[i % len(devices)])))
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*tasks)
    return latencies


async def _ingest(client: httpx.AsyncClient, tokens: list[str], seconds: float) -> float:
    stored = 0
    end = time.perf_counter() + seconds

    async def sender(token: str) -> None:
        nonlocal stored
        while time.perf_counter() < end:
            body = {"ts": int(time.time() * 1000), "values": {f"k{j}": j for j in range(10)}}
            answer = await client.post(f"/api/v1/{token}/telemetry", json=body)
            if answer.status_code == 200:
                stored += 10

    await asyncio.gather(*(sender(t) for t in tokens))
    return stored / seconds


async def _run(quick: bool) -> dict[str, Any]:
    seconds = 3.0 if quick else 10.0
    queued_devices = 200 if quick else 1000
    async with temporary_database() as url:
        port = _free_port()
        data = Path(tempfile.mkdtemp(prefix="iiot-bench-commands-"))
        env = {
            **os.environ,
            "IIOT_DATA_DIR": str(data),
            "IIOT_DATABASE_URL": url,
            "IIOT_HTTP_PORT": str(port),
            "IIOT_BIND_HOST": "127.0.0.1",
            "IIOT_ADMIN_USERNAME": "admin",
            "IIOT_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "IIOT_BCRYPT_ROUNDS": "4",
            "IIOT_MQTT_PORT": "0",
            "IIOT_COAP_PORT": "0",
            "IIOT_OPCUA_PORT": "0",
            "IIOT_LOG_LEVEL": "WARNING",
        }
        proc = subprocess.Popen([sys.executable, "-m", "iiot", "run"], env=env)  # noqa: ASYNC220
        try:
            await _wait_port(port)
            limits = httpx.Limits(max_connections=queued_devices + 200)
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits
            ) as client:
                login = await client.post(
                    "/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
                )
                admin = {"Authorization": f"Bearer {login.json()['access_token']}"}
                devices = await _devices(client, admin, queued_devices)
                tokens = [d["token"] for d in devices]

                # Ingestion alone, then with 100 commands/s flowing (round trips measured).
                base = await _ingest(client, tokens[:20], seconds)
                stop = asyncio.Event()
                pollers = [
                    asyncio.create_task(_answering(client, d["token"], stop))
                    for d in devices[20:40]
                ]
                await asyncio.sleep(0.5)
                both = await asyncio.gather(
                    _ingest(client, tokens[:20], seconds),
                    _round_trips(client, admin, devices[20:40], 100, seconds),
                )
                with_commands, latencies = both
                stop.set()
                await asyncio.gather(*pollers)

                # Persistent commands for offline devices, then every device connects.
                offline = devices[40:]
                sem = asyncio.Semaphore(50)

                async def queue(device: dict[str, Any]) -> None:
                    async with sem:
                        await client.post(
                            f"/api/devices/{device['id']}/commands",
                            json={"method": "wake", "persistent": True, "oneway": True},
                            headers=admin,
                        )

                await asyncio.gather(*(queue(d) for d in offline))
                start = time.perf_counter()
                polls = await asyncio.gather(
                    *(
                        client.get(f"/api/v1/{d['token']}/rpc", params={"timeout": 30_000})
                        for d in offline
                    )
                )
                drained_s = time.perf_counter() - start
                delivered = sum(1 for p in polls if p.status_code == 200)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    p50 = statistics.median(latencies) if latencies else None
    p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 100 else None
    return {
        "name": "commands",
        "figures": [
            {
                "label": "command round trip p50 (HTTP long poll device)",
                "value": p50,
                "unit": "ms",
                "kind": "latency",
            },
            {
                "label": "command round trip p99 (goal < 50 ms)",
                "value": p99,
                "unit": "ms",
                "kind": "latency",
            },
            {
                "label": f"{len(offline)} queued commands delivered after connect",
                "value": round(drained_s, 3),
                "unit": "s",
                "kind": "latency",
            },
            throughput(
                "HTTP ingest with 100 commands/s",
                with_commands,
                "HTTP ingest without commands",
                base,
            ),
        ],
        "notes": [
            f"{len(latencies)} round trips answered 200;"
            f" {delivered}/{len(offline)} queued commands delivered",
            "goals: p99 < 50 ms, queued delivery < 5 s, ingest ratio >= 0.9",
        ],
        "params": {"seconds": seconds, "devices": queued_devices},
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Run the benchmark (about a minute; seconds with `quick`)."""
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
