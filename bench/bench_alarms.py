"""Alarms: ingest throughput with one active rule per device, and raise-to-webhook latency.

    .venv/bin/python -m bench.bench_alarms [--quick] [--json PATH]

One platform process (in this process, PostgreSQL in a throwaway `iiot_bench_*` database,
protocols off) with DEVICES devices. Messages of KEYS points each go in through the
ingestor's fast path (as the MQTT adapter uses it) and are timed until every one is
committed:
  no rules   the fleet's messages with no rule defined;
  rules      the same after one threshold rule per device (on a key of every message,
             never crossed: each point is evaluated, no alarm is raised);
the two alternate REPEAT times and the best of each is reported; the goal is >= 0.9.
Raise-to-webhook latency: a rule and a webhook to a local HTTP receiver; a value above
the threshold is sent (an alarm is raised), then one below (it clears); the time from the
commit of the crossing point to the webhook's arrival is sampled SAMPLES times; p50/p99
are reported (goal: p99 < 1 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.figures import throughput
from bench.pg import temporary_database

DEVICES = 1000
KEYS = 5
FULL = {"messages": 60_000, "repeat": 3, "samples": 100}
QUICK = {"messages": 10_000, "repeat": 1, "samples": 20}


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _ingest(
    services: Any, engine: Any, devices: list[Any], messages: int, start_ts: int
) -> float:
    """Points/s of `messages` messages round-robin over the devices, until all committed
    and evaluated (the engine has caught up: its work is inside the timed window)."""
    from iiot.model import DevicePoints, Point

    done = asyncio.get_running_loop().create_future()
    remaining = messages
    failures = 0

    def on_done(error: BaseException | None) -> None:
        nonlocal remaining, failures
        remaining -= 1
        failures += error is not None
        if remaining == 0 and not done.done():
            done.set_result(None)

    pipeline = services.pipeline
    started = time.perf_counter()
    for n in range(messages):
        device = devices[n % len(devices)]
        ts = start_ts + n // len(devices)
        points = tuple(Point(f"k{k}", ts, float(n % 50)) for k in range(KEYS))
        item = DevicePoints(device, points)
        while not pipeline.enqueue(item, "bench", on_done):  # noqa: ASYNC110
            await asyncio.sleep(0.001)  # queue full: back-pressure, as an adapter sees it
        if n % 1000 == 0:
            await asyncio.sleep(0)
    await done
    while engine.backlog():  # noqa: ASYNC110 - polls another task's queue
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{failures} messages were not committed")
    return messages * KEYS / elapsed


async def _receiver(arrivals: asyncio.Queue[tuple[float, dict[str, Any]]]) -> tuple[Any, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        arrivals.put_nowait((time.perf_counter(), json.loads(body)))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _latency(services: Any, device: Any, samples: int) -> list[float]:
    """Milliseconds from the commit of a crossing point to its webhook's arrival."""
    from iiot.model import DevicePoints, Point

    alarms = services.alarms
    arrivals: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()
    server, port = await _receiver(arrivals)
    async with server:
        await alarms.store.create_webhook(
            device.tenant_id, f"http://127.0.0.1:{port}/hook", "secret", ("alarm.raised",)
        )
        rule = await alarms.store.create_rule(
            device.tenant_id,
            {
                "name": "latency",
                "kind": "threshold",
                "target": {"device_id": str(device.id)},
                "key": "probe",
                "severity": "MAJOR",
                "create": {"op": "gt", "value": 50, "for_s": 0},
                "clear": None,
                "alarm_type": "latency",
                "enabled": True,
            },
        )
        alarms.announce_rule("created", rule)
        await asyncio.sleep(1)  # the engine has loaded it
        ts = int(time.time() * 1000)
        waits: list[float] = []
        for _ in range(samples):
            ts += 10
            await services.pipeline.submit(DevicePoints(device, (Point("probe", ts, 100.0),)), "b")
            committed = time.perf_counter()
            arrived, body = await asyncio.wait_for(arrivals.get(), 30)
            assert body["event"] == "alarm.raised"
            waits.append((arrived - committed) * 1000)
            ts += 10
            await services.pipeline.submit(DevicePoints(device, (Point("probe", ts, 0.0),)), "b")
            await asyncio.sleep(0.05)  # cleared before the next raise
    return waits


async def _run(quick: bool) -> dict[str, Any]:
    from iiot.alarms.engine import AlarmEngine
    from iiot.app import Platform
    from iiot.config import load_settings
    from iiot.runtime import tune_garbage_collector

    tune_garbage_collector()
    sizes = QUICK if quick else FULL
    messages, repeat, samples = sizes["messages"], sizes["repeat"], sizes["samples"]
    async with temporary_database() as db_url:
        with tempfile.TemporaryDirectory() as data_dir:
            env = {
                "IIOT_DATA_DIR": data_dir,
                "IIOT_DATABASE_URL": db_url,
                "IIOT_HTTP_PORT": "0",
                "IIOT_MQTT_PORT": "0",
                "IIOT_COAP_PORT": "0",
                "IIOT_OPCUA_PORT": "0",
                "IIOT_ADMIN_PASSWORD": uuid.uuid4().hex,
                "IIOT_LOG_LEVEL": "WARNING",
            }
            async with Platform(load_settings(env)) as platform:
                services = platform.services
                engine = next(c for c in platform.components if isinstance(c, AlarmEngine))
                tenant = await services.store.create_tenant("bench")
                devices = []
                for n in range(DEVICES):
                    device, _ = await services.registry.create_device(tenant.id, f"d{n}")
                    devices.append(device)
                _progress(f"{DEVICES} devices")
                start_ts = int(time.time() * 1000) - 10_000_000
                await _ingest(services, engine, devices, min(messages, 5000), start_ts)  # warm-up
                start_ts += 10_000
                without: list[float] = []
                with_rules: list[float] = []
                await _define_rules(services, tenant.id, devices)
                _progress(f"{DEVICES} rules")
                for round_ in range(repeat):
                    # ABBA order: a slower database later in the run hits both alike.
                    for rules_on in (False, True) if round_ % 2 == 0 else (True, False):
                        await _enable_rules(services, rules_on)
                        rate = await _ingest(services, engine, devices, messages, start_ts)
                        (with_rules if rules_on else without).append(rate)
                        start_ts += messages // DEVICES + 1
                    _progress(f"round {round_ + 1}: {without[-1]:,.0f} vs {with_rules[-1]:,.0f}")
                await _enable_rules(services, False)
                waits = await _latency(services, devices[0], samples)
    waits.sort()
    p50 = statistics.median(waits)
    p99 = waits[min(len(waits) - 1, int(len(waits) * 0.99))]
    best_without, best_with = max(without), max(with_rules)
    ratio = best_with / best_without
    median_ratio = statistics.median(w / o for w, o in zip(with_rules, without, strict=True))
    latency_figures = [
        {
            "label": f"raise-to-webhook latency p{p}",
            "value": round(v, 1),
            "unit": "ms",
            "baseline_label": "goal (p99)",
            "baseline_value": 1000.0,
            "ratio": round(v / 1000.0, 3),
            "kind": "latency",
        }
        for p, v in (("50", p50), ("99", p99))
    ]
    return {
        "name": "alarms",
        "figures": [
            throughput(
                f"ingest with one rule per device ({DEVICES} devices)",
                best_with,
                "the same with no rules",
                best_without,
            ),
            *latency_figures,
        ],
        "notes": [
            f"ingest ratio {ratio:.3f} (goal >= 0.9); best of {repeat} alternating runs of "
            f"{messages} messages x {KEYS} points (ABBA order), PostgreSQL, in-process "
            f"pipeline, timed until committed and evaluated; median of the rounds' ratios "
            f"{median_ratio:.3f}",
            f"raise-to-webhook p50 {p50:.1f} ms, p99 {p99:.1f} ms over {samples} alarms "
            "(goal p99 < 1000 ms)",
        ],
        "params": {"devices": DEVICES, "messages": messages, "repeat": repeat},
        "details": {
            "without_rules_points_s": [round(v) for v in without],
            "with_rules_points_s": [round(v) for v in with_rules],
            "latency_ms": [round(w, 2) for w in waits],
            "load_average_at_end": os.getloadavg(),
        },
    }


_RULES: list[Any] = []


async def _define_rules(services: Any, tenant_id: uuid.UUID, devices: list[Any]) -> None:
    """One threshold rule per device on a key of every message, never crossed; disabled."""
    for device in devices:
        rule = await services.alarms.store.create_rule(
            tenant_id,
            {
                "name": f"r-{device.id}",
                "kind": "threshold",
                "target": {"device_id": str(device.id)},
                "key": "k0",
                "severity": "MINOR",
                "create": {"op": "gt", "value": 1e9, "for_s": 0},
                "clear": None,
                "alarm_type": "never",
                "enabled": False,
            },
        )
        _RULES.append(rule)


async def _enable_rules(services: Any, enabled: bool) -> None:
    """Turn every bench rule on or off, and wait until the engine has reloaded them."""
    store = services.alarms.store
    for rule in _RULES:
        await store.replace_rule(rule.tenant_id, rule.id, {**rule.spec, "enabled": enabled})
    services.alarms.announce_rule("updated", _RULES[0])
    await asyncio.sleep(1)


def run(quick: bool = False) -> dict[str, Any]:
    """The alarm benchmark with its standard sizes (`quick`: smaller)."""
    return asyncio.run(_run(quick))


def main() -> None:
    """Run the alarm benchmark and print (and optionally save) its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.quick)
    for figure in result["figures"]:
        print(f"{figure['label']}: {figure['value']} {figure['unit']} (ratio {figure['ratio']})")
    for note in result["notes"]:
        print(f"- {note}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
