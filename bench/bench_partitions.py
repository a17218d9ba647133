"""Large telemetry tables on PostgreSQL: weekly partitions at two table sizes, and retention.

    .venv/bin/python -m bench.bench_partitions [--quick] [--small N] [--large N]
                                               [--seconds S] [--json PATH]

1. A fresh database (`iiot_bench_*`, dropped afterwards) is filled through SQL
   (`INSERT ... SELECT generate_series`, into the partitioned table with its key) with
   --small points: 1,000 devices of 10 tenants, 4 keys, points evenly spaced so that the
   small table spans 25 hours back from now (the large one the same spacing, further
   back): the 24-hour history query returns as many points at both sizes. The weeks the
   data spans get their partitions first, as a platform running then would have made them.
2. At that size it measures, each for --seconds:
   - writes: `PostgresStore.write_points` of 5,000-point batches of new points (now and
     on), one after the other, in points/s;
   - the API's read mix, on the store (the queries the REST API runs, without HTTP): per
     request a random device's latest values, its 24-hour history of one key, or a page
     of the device list, from 16 concurrent tasks, in requests/s.
3. It adds older points until the table holds --large points and measures the same again.
   The figures are the large table's beside the small one's (the goal: within 10 %).
4. Retention: a separate tenant holds 35 days of its own data (10 devices, 4 keys, one
   point a minute), five weeks before the rest; `delete_telemetry_before` past those
   weeks is timed (the goal: under a second when the data fills whole partitions).

The machine is shared: every figure is a ratio to one measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

from bench.figures import throughput
from bench.pg import temporary_database
from iiot.model import Device, DevicePoints, Point
from iiot.storage import TelemetryQuery
from iiot.storage._common import now_ms
from iiot.storage.postgres import PostgresStore
from iiot.storage.postgres_partitions import WEEK_MS, ensure_partitions

__all__ = ["main", "run"]

DEVICES, TENANTS, KEYS = 1000, 10, ("temperature", "pressure", "humidity", "vibration")
DAY_MS = 86_400_000
ARCHIVE_DEVICES, ARCHIVE_STEP_MS, ARCHIVE_DAYS = 10, 60_000, 35
BATCH = 5000


def _progress(text: str) -> None:
    print(f"[partitions] {text}", file=sys.stderr, flush=True)


async def _make_weeks(url: str, first_ms: int, last_ms: int) -> None:
    conn = await asyncpg.connect(url)

    async def run(op: Any) -> Any:
        return await op(conn)

    try:
        for week in range(first_ms // WEEK_MS, last_ms // WEEK_MS + 1):
            await ensure_partitions(run, now_ms=week * WEEK_MS)
    finally:
        await conn.close()


async def _fill(
    url: str, ids: list[uuid.UUID], keys: Sequence[str], end: int, steps: range, step_ms: int
) -> None:
    """Points at end - i * step_ms for i in steps, for every device and key."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET synchronous_commit = off")
        await conn.execute(
            "INSERT INTO telemetry (device_id, key, ts, num_value)"
            " SELECT d.id, k.key, $3::bigint - s.i * $4::bigint, 20 + random()"
            " FROM unnest($1::uuid[]) AS d(id) CROSS JOIN unnest($2::text[]) AS k(key)"
            " CROSS JOIN generate_series($5::int, $6::int) AS s(i)",
            ids,
            list(keys),
            end,
            step_ms,
            steps.start,
            steps.stop - 1,
        )
    finally:
        await conn.close()


async def _fill_parallel(
    url: str, ids: list[uuid.UUID], end: int, steps: range, step_ms: int
) -> None:
    half = len(ids) // 2  # two loaders: one per core
    await asyncio.gather(
        _fill(url, ids[:half], KEYS, end, steps, step_ms),
        _fill(url, ids[half:], KEYS, end, steps, step_ms),
    )


async def _vacuum(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("VACUUM (ANALYZE) telemetry")
        await conn.execute("CHECKPOINT")  # the fill's writes flushed now, not while measuring
    finally:
        await conn.close()


async def _writes(
    store: PostgresStore, devices: list[Device], start_ts: int, seconds: float
) -> tuple[float, int]:
    """Points/s of consecutive 5,000-point batches for `seconds`; returns it and the next ts."""
    per_batch = BATCH // len(KEYS)
    written, ts, i = 0, start_ts, 0
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        batch = []
        for _ in range(per_batch):
            device = devices[i % len(devices)]
            batch.append(DevicePoints(device, tuple(Point(k, ts, 21.5) for k in KEYS)))
            i += 1
            if i % len(devices) == 0:
                ts += 1000
        await store.write_points(batch)
        written += per_batch * len(KEYS)
    return written / (time.perf_counter() - began), ts + 1000


async def _reads(store: PostgresStore, devices: list[Device], end: int, seconds: float) -> float:
    """Requests/s of the API's read mix from 16 concurrent tasks."""
    done = 0
    stop = time.perf_counter() + seconds
    rng = random.Random(7)

    async def user() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            device = rng.choice(devices)
            pick = rng.random()
            if pick < 0.45:
                await store.latest(None, device.id)
            elif pick < 0.9:
                query = TelemetryQuery(
                    start=end - DAY_MS, end=end + 1, keys=(rng.choice(KEYS),), limit=10_000
                )
                await store.query_telemetry(None, device.id, query)
            else:
                await store.list_devices(device.tenant_id, 100, 0)
            done += 1

    began = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(16)))
    return done / (time.perf_counter() - began)


async def _count(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM telemetry"))
    finally:
        await conn.close()


async def measure(small: int, large: int, seconds: float) -> dict[str, Any]:
    """Run the whole benchmark; returns its result."""
    series = DEVICES * len(KEYS)
    end = now_ms() // 1000 * 1000
    async with temporary_database("iiot_bench_parts") as url:
        async with PostgresStore(url) as store:
            tenants = [await store.create_tenant(f"t{i}") for i in range(TENANTS)]
            devices = [
                await store.create_device(tenants[i % TENANTS].id, f"d{i}", f"h{uuid.uuid4()}")
                for i in range(DEVICES)
            ]
            archive = await store.create_tenant("archive")
            kept = [
                await store.create_device(archive.id, f"a{i}", f"h{uuid.uuid4()}")
                for i in range(ARCHIVE_DEVICES)
            ]
        ids = [d.id for d in devices]
        small_steps = small // series
        large_steps = large // series
        step_ms = 25 * 3_600_000 // small_steps
        # The archive's data: five weeks wholly before the fleet's oldest week.
        oldest_fleet = end - large_steps * step_ms
        archive_end = (oldest_fleet // WEEK_MS - 1) * WEEK_MS - 1
        archive_first = archive_end - ARCHIVE_DAYS * DAY_MS
        await _make_weeks(url, archive_first, end + WEEK_MS)
        _progress(f"filling {small:,} points")
        started = time.perf_counter()
        await _fill_parallel(url, ids, end, range(1, small_steps + 1), step_ms)
        await _fill(
            url,
            [d.id for d in kept],
            KEYS,
            archive_end,
            range(0, ARCHIVE_DAYS * DAY_MS // ARCHIVE_STEP_MS),
            ARCHIVE_STEP_MS,
        )
        await _vacuum(url)
        fill_small_s = time.perf_counter() - started
        results: dict[str, dict[str, float]] = {}
        next_ts = end
        for size, steps in (("small", small_steps), ("large", large_steps)):
            if size == "large":
                _progress(f"growing to {large:,} points")
                started = time.perf_counter()
                await _fill_parallel(url, ids, end, range(small_steps + 1, steps + 1), step_ms)
                await _vacuum(url)
                fill_large_s = time.perf_counter() - started
            async with PostgresStore(url) as store:
                await store.write_points(  # warm the store's caches (devices, series)
                    [DevicePoints(d, tuple(Point(k, next_ts, 1.0) for k in KEYS)) for d in devices]
                )
                next_ts += 1000
                _progress(f"{size}: writes")
                write_rate, next_ts = await _writes(store, devices, next_ts, seconds)
                _progress(f"{size}: read mix")
                read_rate = await _reads(store, devices, end, seconds)
            results[size] = {"points": await _count(url), "write": write_rate, "read": read_rate}
            _progress(f"{size}: {results[size]}")
        async with PostgresStore(url) as store:
            conn = await asyncpg.connect(url)
            try:
                partitions_before = await conn.fetchval(
                    "SELECT count(*) FROM pg_inherits WHERE inhparent = 'telemetry'::regclass"
                )
            finally:
                await conn.close()
            began = time.perf_counter()
            removed = await store.delete_telemetry_before(archive.id, archive_end + 1)
            retention_s = time.perf_counter() - began
            conn = await asyncpg.connect(url)
            try:
                partitions_after = await conn.fetchval(
                    "SELECT count(*) FROM pg_inherits WHERE inhparent = 'telemetry'::regclass"
                )
                archive_left = await conn.fetchval(
                    "SELECT count(*) FROM telemetry WHERE device_id = ANY($1::uuid[])",
                    [d.id for d in kept],
                )
            finally:
                await conn.close()
    small_r, large_r = results["small"], results["large"]
    archive_points = ARCHIVE_DEVICES * len(KEYS) * (ARCHIVE_DAYS * DAY_MS // ARCHIVE_STEP_MS)
    figures = [
        throughput(
            f"write_points at {large_r['points']:,} points",
            large_r["write"],
            f"at {small_r['points']:,} points",
            small_r["write"],
        ),
        throughput(
            f"read mix (latest, 24 h history, device list) at {large_r['points']:,} points",
            large_r["read"],
            f"at {small_r['points']:,} points",
            small_r["read"],
            unit="req/s",
        ),
        {
            "label": f"retention: {ARCHIVE_DAYS} days of one tenant ({archive_points:,} points)",
            "value": round(retention_s, 3),
            "unit": "s",
            "baseline_label": "goal",
            "baseline_value": 1.0,
            "ratio": round(retention_s, 3),
            "kind": "latency",
        },
    ]
    return {
        "name": "partitions",
        "figures": figures,
        "notes": [
            f"fill: {fill_small_s:.0f} s to {small:,} points, {fill_large_s:.0f} s more to"
            f" {large:,}; each measurement {seconds:g} s on a shared 2-core machine",
            f"retention removed about {removed:,} points, partitions {partitions_before} ->"
            f" {partitions_after}, archive points left {archive_left}",
        ],
        "params": {"small": small, "large": large, "seconds": seconds, "step_ms": step_ms},
        "details": results,
    }


def run(quick: bool = False) -> dict[str, Any]:
    """The benchmark at its default (or quick) sizes."""
    if quick:
        return asyncio.run(measure(1_000_000, 5_000_000, 10))
    return asyncio.run(measure(10_000_000, 50_000_000, 20))


def main(argv: Sequence[str] | None = None) -> None:
    """Print the result (and write it as JSON with --json)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--small", type=int, help="points of the first measurement")
    parser.add_argument("--large", type=int, help="points of the second measurement")
    parser.add_argument("--seconds", type=float, help="seconds per measurement")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.small or args.large or args.seconds:
        result = asyncio.run(
            measure(args.small or 10_000_000, args.large or 50_000_000, args.seconds or 20)
        )
    else:
        result = run(args.quick)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
