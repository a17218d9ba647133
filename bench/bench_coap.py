"""CoAP ingestion throughput: the platform's `POST /api/v1/{token}/telemetry` (answered once the
points are committed to SQLite) beside a bare aiocoap server that answers 2.04 doing no work.
The platform runs in its default configuration (every protocol on, SQLite).

Both servers run in their own process and get the same load: concurrent aiocoap client
contexts (aiocoap allows one confirmable exchange per peer at a time), each posting
sequentially. Reported: requests per second of each and the ratio platform / bare.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap.numbers.codes import Code

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.profiles import platform_ports  # noqa: E402
from tests.support import free_port, platform_env, platform_process, running_platform  # noqa: E402

CLIENTS = 16
BASE_TS = 1_767_225_600_000

_BARE_SERVER = """
import asyncio, sys
import aiocoap
from aiocoap import resource

class Sink(resource.Resource):
    async def render_post(self, request):
        return aiocoap.Message(code=aiocoap.CHANGED)

async def main():
    site = resource.Site()
    site.add_resource(["api", "v1", "t", "telemetry"], Sink())
    await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", int(sys.argv[1])), transports=["udp6"]
    )
    print("ready", flush=True)
    await asyncio.get_running_loop().create_future()

asyncio.run(main())
"""


async def _load(uri: str, total: int) -> float:
    """Send `total` confirmable POSTs from CLIENTS clients; returns requests per second."""

    async def client(indexes: range) -> None:
        context = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            for i in indexes:
                payload = json.dumps({"ts": BASE_TS + i, "values": {"v": i}}).encode()
                request = aiocoap.Message(code=Code.POST, uri=uri, payload=payload)
                response = await asyncio.wait_for(context.request(request).response, 60)
                if response.code != Code.CHANGED:
                    raise RuntimeError(f"unexpected answer {response.code}: {response.payload!r}")
        finally:
            await context.shutdown()

    started = time.perf_counter()
    await asyncio.gather(*(client(range(c, total, CLIENTS)) for c in range(CLIENTS)))
    return total / (time.perf_counter() - started)


@contextlib.contextmanager
def _bare_server(port: int) -> Iterator[None]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _BARE_SERVER, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("bare aiocoap server did not start")
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def _create_device(env: dict[str, str]) -> str:
    async with running_platform(env) as platform:
        tenant = await platform.services.store.create_tenant("bench")
        _, token = await platform.services.registry.create_device(tenant.id, "bench-device")
    return token


async def _run(total: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as data:
        env = platform_env(Path(data), IIOT_LOG_LEVEL="ERROR")
        token = await _create_device(env)
        coap_port, http_port = free_port(socket.SOCK_DGRAM), free_port()
        # `iiot run` as users run it: every protocol on (each on a free port), SQLite.
        served = {
            **env,
            **platform_ports("defaults"),
            "IIOT_COAP_PORT": str(coap_port),
            "IIOT_HTTP_PORT": str(http_port),
        }
        with platform_process(served):
            uri = f"coap://127.0.0.1:{coap_port}/api/v1/{token}/telemetry"
            await _load(uri, min(200, total))  # warm-up: caches, SQLite pages
            platform_rps = await _load(uri, total)
    bare_port = free_port(socket.SOCK_DGRAM)
    with _bare_server(bare_port):
        uri = f"coap://127.0.0.1:{bare_port}/api/v1/t/telemetry"
        await _load(uri, min(200, total))
        bare_rps = await _load(uri, total)
    ratio = round(platform_rps / bare_rps, 3) if bare_rps else None
    return {
        "name": "coap",
        "figures": [
            {
                "label": f"confirmable POST telemetry, {CLIENTS} clients",
                "value": round(platform_rps, 1),
                "unit": "req/s",
                "baseline_label": "bare aiocoap server answering 2.04, no work, same clients",
                "baseline_value": round(bare_rps, 1),
                "ratio": ratio,
                "kind": "throughput",
            }
        ],
        "notes": [
            f"{total:,} requests per server after {min(200, total)} warm-up requests; the"
            " platform (own process, SQLite) answers 2.04 once the points are committed,"
            " the bare server (another process) at once.",
        ],
        "params": {"requests": total, "clients": CLIENTS, "cpus": os.cpu_count()},
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Measure CoAP requests per second of the platform and of a bare aiocoap server."""
    return asyncio.run(_run(2000 if quick else 10_000))


def main() -> None:
    """Print the figures; `--json PATH` also writes them to a file."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    args = parser.parse_args()
    results = run(quick=args.quick)
    for f in results["figures"]:
        print(
            f"{f['label']}: {f['value']:,} {f['unit']}; baseline {f['baseline_label']}:"
            f" {f['baseline_value']:,} {f['unit']}; ratio {f['ratio']}"
        )
    for note in results["notes"]:
        print(f"- {note}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
