"""OPC UA live-update rate: values per second a subscribed client receives.

Platform: telemetry enters through the ingest pipeline (decode, SQLite commit, live bus) and
reaches the client through the OPC UA address space. Baseline, in the same run and process:
asyncua's bare server whose variables are written in a loop, doing no other work. Both serve
the same number of variables to the same client subscription (None security policy on both,
so the figure measures the work rather than the encryption). Also reports the latency from
submitting one value to the client receiving it.

    python bench/bench_opcua.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from asyncua import ua as _ua
from asyncua.client.client import Client
from asyncua.server.server import Server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from iiot.app import Platform  # noqa: E402
from iiot.config import load_settings  # noqa: E402
from tests.support import ADMIN_PASSWORD, free_port, platform_env  # noqa: E402

ua: Any = _ua  # asyncua's generated stubs mistype NodeId and DataValue arguments

DEVICES = 100
KEYS = 10  # per device: DEVICES * KEYS variables served and subscribed
PUBLISH_MS = 10  # client subscription publishing interval
QUEUE = 1000  # monitored item queue size: every value is delivered, not just the last


class _Counter:
    def __init__(self) -> None:
        self.count = 0
        self.arrivals: dict[Any, float] = {}
        self.arrived = asyncio.Event()

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.count += 1
        self.arrivals[val] = time.perf_counter()
        self.arrived.set()


def _client(endpoint: str) -> Client:
    """A client; on the platform it logs in as its administrator (anonymous sessions see
    no tenant's nodes), on the bare server it stays anonymous."""
    client = Client(endpoint, timeout=30)
    if endpoint.endswith("/iiot/"):
        client.set_user("admin")
        client.set_password(ADMIN_PASSWORD)
    return client


async def _measure(
    endpoint: str,
    nodes_of: Callable[[Client], Awaitable[list[Any]]],
    produce: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    seconds: float,
) -> float:
    """Values per second received while `produce` runs for `seconds`."""
    async with _client(endpoint) as client:
        counter = _Counter()
        sub = await client.create_subscription(PUBLISH_MS, counter)
        await sub.subscribe_data_change(await nodes_of(client), queuesize=QUEUE)
        await asyncio.sleep(0.5)  # initial values
        stop = asyncio.Event()
        producer = asyncio.create_task(produce(stop))
        await asyncio.sleep(0.5)  # warm up
        before, started = counter.count, time.perf_counter()
        await asyncio.sleep(seconds)
        received, elapsed = counter.count - before, time.perf_counter() - started
        stop.set()
        await producer
        await sub.delete()
    return received / elapsed


async def _latency(
    endpoint: str,
    node_of: Callable[[Client], Awaitable[Any]],
    send: Callable[[float], Awaitable[None]],
    samples: int,
) -> list[float]:
    """Seconds from submitting a value to the client receiving it, one value at a time."""
    async with _client(endpoint) as client:
        counter = _Counter()
        sub = await client.create_subscription(PUBLISH_MS, counter)
        await sub.subscribe_data_change(await node_of(client), queuesize=QUEUE)
        await asyncio.sleep(0.5)
        delays = []
        for i in range(samples):
            value = 1_000_000.0 + i
            sent = time.perf_counter()
            await send(value)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    while value not in counter.arrivals:
                        counter.arrived.clear()
                        await counter.arrived.wait()
            if value in counter.arrivals:
                delays.append(counter.arrivals[value] - sent)
            await asyncio.sleep(0.05)
        await sub.delete()
    return delays


# --- the platform --------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def _platform(data_dir: Path) -> AsyncIterator[tuple[Platform, int]]:
    port = free_port()
    env = platform_env(data_dir, IIOT_OPCUA_PORT=str(port), IIOT_OPCUA_ALLOW_NONE="1")
    async with Platform(load_settings(env)) as platform:
        yield platform, port


async def _platform_figures(seconds: float, samples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        async with _platform(Path(tmp)) as (platform, port):
            services = platform.services
            tenant = await services.store.create_tenant("bench")
            devices = [
                (await services.registry.create_device(tenant.id, f"meter-{d}"))[0]
                for d in range(DEVICES)
            ]
            keys = [f"k{i}" for i in range(KEYS)]
            ts = [int(time.time() * 1000)]

            async def submit_one(device: Any, value: float | None = None) -> None:
                ts[0] += 1
                values = {k: (value if value is not None else float(ts[0])) for k in keys}
                body = json.dumps({"ts": ts[0], "values": values}).encode()
                await services.ingestor.ingest(device, body, "bench")

            async def submit(value: float) -> None:
                await submit_one(devices[0], value)

            await asyncio.gather(*(submit_one(device) for device in devices))
            await asyncio.sleep(0.5)
            endpoint = f"opc.tcp://127.0.0.1:{port}/iiot/"

            async def nodes_of(client: Client) -> list[Any]:
                ns = await client.get_namespace_index("urn:iiot:platform")
                return [
                    client.get_node(ua.NodeId(f"device:{device.id}:telemetry:{k}", ns))
                    for device in devices
                    for k in keys
                ]

            async def produce(stop: asyncio.Event) -> None:
                # Every device sends one message (all its keys, a new ts) after another,
                # each waiting for its commit as a device waits for its acknowledgement.
                async def device_loop(device: Any) -> None:
                    while not stop.is_set():
                        await submit_one(device)

                await asyncio.gather(*(device_loop(device) for device in devices))

            rate = await _measure(endpoint, nodes_of, produce, seconds)

            async def node_of(client: Client) -> Any:
                return (await nodes_of(client))[0]

            delays = await _latency(endpoint, node_of, submit, samples)
    return {"rate": rate, "delays": delays}


# --- the bare asyncua server ---------------------------------------------------------------
async def _bare_figures(seconds: float, samples: int) -> dict[str, Any]:
    port = free_port()
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/bare/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await server.register_namespace("urn:bench:bare")
    variables = []
    for d in range(DEVICES):
        obj = await server.nodes.objects.add_object(ns, f"meter-{d}")
        variables += [await obj.add_variable(ns, f"k{i}", 0.0) for i in range(KEYS)]
    ids = [v.nodeid for v in variables]
    await server.start()
    counter = [0]

    async def write_all(value: float, nodeids: list[Any] = ids) -> None:
        now = datetime.datetime.now(datetime.UTC)
        for nodeid in nodeids:
            await server.write_attribute_value(
                nodeid,
                ua.DataValue(
                    ua.Variant(value, ua.VariantType.Double),
                    SourceTimestamp=now,
                    ServerTimestamp=now,
                ),
            )

    async def produce(stop: asyncio.Event) -> None:
        while not stop.is_set():
            counter[0] += 1
            await write_all(float(counter[0]))
            await asyncio.sleep(0)  # let the server publish, as the platform's loop would

    async def nodes_of(client: Client) -> list[Any]:
        return [client.get_node(i) for i in ids]

    async def node_of(client: Client) -> Any:
        return client.get_node(ids[0])

    try:
        endpoint = f"opc.tcp://127.0.0.1:{port}/bare/"
        rate = await _measure(endpoint, nodes_of, produce, seconds)
        delays = await _latency(endpoint, node_of, lambda v: write_all(v, ids[:KEYS]), samples)
    finally:
        await server.stop()
    return {"rate": rate, "delays": delays}


def _ms(delays: list[float], q: float) -> float | None:
    if not delays:
        return None
    ordered = sorted(delays)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


async def _run(quick: bool) -> dict[str, Any]:
    seconds, samples = (3.0, 10) if quick else (8.0, 30)
    bare = await _bare_figures(seconds, samples)
    platform = await _platform_figures(seconds, samples)
    variables = DEVICES * KEYS
    rate, base_rate = round(platform["rate"]), round(bare["rate"])
    same_client = "same client subscription"
    figures: list[dict[str, Any]] = [
        {
            "label": f"live values to a client, {variables:,} variables",
            "value": rate,
            "unit": "values/s",
            "baseline_label": f"bare asyncua server writing its variables in a loop, {same_client}",
            "baseline_value": base_rate,
            "ratio": round(rate / base_rate, 3) if base_rate else None,
            "kind": "throughput",
        }
    ]
    for name, q in (("p50", 0.5), ("max", 1.0)):
        value, baseline = _ms(platform["delays"], q), _ms(bare["delays"], q)
        figures.append(
            {
                "label": f"latency {name}, ingest -> client notification",
                "value": value,
                "unit": "ms",
                "baseline_label": "bare asyncua server: write -> client notification",
                "baseline_value": baseline,
                # For a latency the ratio is how many times slower than the baseline.
                "ratio": round(value / baseline, 3) if value is not None and baseline else None,
                "kind": "latency",
            }
        )
    return {
        "name": "opcua",
        "figures": figures,
        "notes": [
            f"{seconds:.0f} s of load per server, publishing interval {PUBLISH_MS} ms, queue"
            f" {QUEUE} per item, security None on both; platform and baseline in one process;"
            " platform values enter through the ingest pipeline, one message per device.",
            f"latency: {len(platform['delays'])}/{samples} platform and {len(bare['delays'])}"
            f"/{samples} baseline samples arrived within 5 s; platform ingest goes through the"
            " pipeline (batch delay) and a SQLite commit before the live bus.",
        ],
        "params": {
            "variables": variables,
            "devices": DEVICES,
            "publishing_interval_ms": PUBLISH_MS,
            "seconds": seconds,
            "latency_samples": samples,
        },
        "latency_mean_ms": round(1000 * statistics.mean(platform["delays"]), 2)
        if platform["delays"]
        else None,
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns its figures (platform beside the bare-server baseline)."""
    import logging

    logging.getLogger("asyncua").setLevel(logging.ERROR)
    return asyncio.run(_run(quick))


def main() -> None:
    """Print the figures; `--json PATH` also writes them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter run")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    result = run(quick=args.quick)
    for f in result["figures"]:
        print(
            f"{f['label']}: {f['value']} {f['unit']}; baseline {f['baseline_label']}:"
            f" {f['baseline_value']} {f['unit']}; ratio {f['ratio']}"
        )
    for note in result["notes"]:
        print(f"- {note}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
