"""Storage write throughput: raw database limits against `Store.write_points` (not a test).

    .venv/bin/python bench/bench_store.py [--points N] [--batch N] [--repeat N] [--json PATH]

Figures (points/s):
  a) raw asyncpg COPY of the identical rows into a table shaped like `telemetry` (same
     columns, primary key and check), one COPY and commit per batch: the PostgreSQL limit;
     a_single) the same rows in one single COPY, for reference;
  b) `PostgresStore.write_points` with the same batches;
  c) raw sqlite3 `executemany` of the identical rows in one transaction;
  d) `SqliteStore.write_points` with the same batches.
PostgreSQL runs in a fresh `iiot_bench_*` database on IIOT_BENCH_DATABASE_URL (default: the
local server), dropped afterwards; synchronous_commit keeps the server's setting (on).
Each figure is run --repeat times, alternating with its raw counterpart so that load from
other programs hits both alike; the best run is reported (and the median). Every figure is
a function returning a dict, so that other benchmarks can be added.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from iiot.model import Device, DevicePoints, Point
from iiot.storage._common import Row, batch_rows, dedup_rows
from iiot.storage.postgres import PostgresStore
from iiot.storage.sqlite import SqliteStore

ADMIN_URL = os.environ.get(
    "IIOT_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
DEVICES = 100
KEYS = 10

Batch = list[DevicePoints]


def make_batches(points: int, batch_size: int, devices: Sequence[Device]) -> list[Batch]:
    """Points as a fleet sends them: every device's keys at each tick, cut into batches."""
    rng = random.Random(42)
    keys = [f"sensor_{k}" for k in range(KEYS)]
    start = 1_767_225_600_000
    batches: list[Batch] = []
    current: dict[Device, list[Point]] = {}
    count = 0
    tick = 0
    while count < points:
        ts = start + tick * 1000
        for device in devices:
            for key in keys:
                # Mostly floats, as field data is; some ints and booleans.
                r = rng.random()
                value: float | int | bool = (
                    round(rng.uniform(0, 100), 3)
                    if r < 0.8
                    else rng.randrange(1000)
                    if r < 0.95
                    else r < 0.975
                )
                current.setdefault(device, []).append(Point(key, ts, value))
                count += 1
                if count % batch_size == 0 or count == points:
                    batches.append([DevicePoints(d, tuple(p)) for d, p in current.items()])
                    current = {}
                if count == points:
                    return batches
        tick += 1
    return batches


@asynccontextmanager
async def fresh_pg_database() -> AsyncIterator[str]:
    """A new empty `iiot_bench_*` database on the PostgreSQL server, dropped afterwards."""
    name = f"iiot_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield urlunsplit(urlsplit(ADMIN_URL)._replace(path="/" + name))
    finally:
        admin = await asyncpg.connect(ADMIN_URL)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def _devices(store: PostgresStore | SqliteStore) -> list[Device]:
    tenant = await store.create_tenant("bench")
    return [await store.create_device(tenant.id, f"d{i}", f"h{i}") for i in range(DEVICES)]


def _summary(name: str, points: int, runs: list[float], **extra: Any) -> dict[str, Any]:
    """Best and median of repeated runs (the best is the least disturbed by other load)."""
    best = min(runs)
    return {
        "name": name,
        "points": points,
        "seconds": round(best, 3),
        "points_per_s": round(points / best),
        "median_points_per_s": round(points / statistics.median(runs)),
        "runs_s": [round(r, 3) for r in runs],
        **extra,
    }


async def pg_raw_copy_once(url: str, chunks: list[list[Row]]) -> float:
    """(a) COPY each chunk (one transaction each) into a fresh telemetry-shaped table."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DROP TABLE IF EXISTS raw_telemetry")
        # Same columns, primary key and checks as `telemetry`.
        await conn.execute("CREATE TABLE raw_telemetry (LIKE telemetry INCLUDING ALL)")
        await conn.execute("CHECKPOINT")
        began = time.perf_counter()
        for chunk in chunks:
            await conn.copy_records_to_table("raw_telemetry", records=chunk)
        return time.perf_counter() - began
    finally:
        await conn.execute("DROP TABLE IF EXISTS raw_telemetry")
        await conn.close()


async def pg_store_once(store: PostgresStore, url: str, batches: list[Batch]) -> float:
    """(b) `PostgresStore.write_points` of every batch, one after the other, into empty tables."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE telemetry, telemetry_latest")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    began = time.perf_counter()
    for b in batches:
        await store.write_points(b)
    return time.perf_counter() - began


async def bench_postgres(points: int, batch_size: int, repeat: int) -> dict[str, dict[str, Any]]:
    """Figures a, a_single and b, run alternately so that other load hits both alike."""
    async with fresh_pg_database() as url, PostgresStore(url) as store:
        batches = make_batches(points, batch_size, await _devices(store))
        # Identical rows for the raw COPY: what the store would write, already deduplicated.
        chunks = [dedup_rows(batch_rows(b).rows) for b in batches]
        runs: dict[str, list[float]] = {"a": [], "b": []}
        for _ in range(repeat):
            runs["a"].append(await pg_raw_copy_once(url, chunks))
            runs["b"].append(await pg_store_once(store, url, batches))
        single = await pg_raw_copy_once(url, [[r for chunk in chunks for r in chunk]])
    extra = {"batches": len(batches), "batch_size": batch_size}
    return {
        "a": _summary("pg_raw_copy_per_batch", points, runs["a"], **extra),
        "a_single": _summary("pg_raw_copy_single", points, [single]),
        "b": _summary("pg_store_write_points", points, runs["b"], **extra),
    }


def sqlite_raw_once(path: Path, params: list[tuple[Any, ...]]) -> float:
    """(c) raw sqlite3 executemany of every row in one transaction, same table shape."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(
            "CREATE TABLE raw_telemetry (device_id BLOB NOT NULL, key TEXT NOT NULL,"
            " ts INTEGER NOT NULL, num_value REAL, int_value INTEGER, bool_value INTEGER,"
            " str_value TEXT, PRIMARY KEY (device_id, key, ts)) WITHOUT ROWID"
        )
        began = time.perf_counter()
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO raw_telemetry VALUES (?, ?, ?, ?, ?, ?, ?)", params)
        conn.execute("COMMIT")
        return time.perf_counter() - began
    finally:
        conn.close()


async def sqlite_store_once(path: Path, points: int, batch_size: int) -> float:
    """(d) `SqliteStore.write_points` of every batch, one after the other, in a new file."""
    async with SqliteStore(path) as store:
        batches = make_batches(points, batch_size, await _devices(store))
        began = time.perf_counter()
        for b in batches:
            await store.write_points(b)
        return time.perf_counter() - began


async def bench_sqlite(points: int, batch_size: int, repeat: int) -> dict[str, dict[str, Any]]:
    """Figures c and d, run alternately."""
    devices = [Device(uuid.uuid4(), uuid.uuid4(), f"d{i}", "active") for i in range(DEVICES)]
    batches = make_batches(points, batch_size, devices)
    params = [(r[0].bytes, *r[1:]) for b in batches for r in dedup_rows(batch_rows(b).rows)]
    runs: dict[str, list[float]] = {"c": [], "d": []}
    with tempfile.TemporaryDirectory(prefix="iiot-bench-") as tmp:
        for i in range(repeat):
            runs["c"].append(sqlite_raw_once(Path(tmp) / f"raw{i}.db", params))
            runs["d"].append(
                await sqlite_store_once(Path(tmp) / f"store{i}.db", points, batch_size)
            )
    return {
        "c": _summary("sqlite_raw_executemany_one_tx", points, runs["c"]),
        "d": _summary(
            "sqlite_store_write_points",
            points,
            runs["d"],
            batches=len(batches),
            batch_size=batch_size,
        ),
    }


async def run(points: int, batch_size: int, repeat: int) -> dict[str, Any]:
    """Every storage figure, and the ratios that matter."""
    figures = {
        **await bench_postgres(points, batch_size, repeat),
        **await bench_sqlite(points, batch_size, repeat),
    }
    return {
        "figures": figures,
        "ratio_b_over_a": round(figures["b"]["points_per_s"] / figures["a"]["points_per_s"], 3),
        "ratio_b_over_a_median": round(
            figures["b"]["median_points_per_s"] / figures["a"]["median_points_per_s"], 3
        ),
        "ratio_d_over_c": round(figures["d"]["points_per_s"] / figures["c"]["points_per_s"], 3),
        "environment": {
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "sqlite": sqlite3.sqlite_version,
            "load_average_at_end": os.getloadavg(),
        },
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Run the storage benchmark and print (and optionally save) its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=500_000, help="points per figure")
    parser.add_argument("--batch", type=int, default=5_000, help="points per write_points")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (best is kept)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args.points, args.batch, args.repeat))
    for key, fig in report["figures"].items():
        print(
            f"{key:9} {fig['name']:30} {fig['points_per_s']:>10,} points/s best"
            f"  {fig['median_points_per_s']:>10,} median  runs {fig['runs_s']} s"
        )
    print(
        f"b/a = {report['ratio_b_over_a']:.2f} (median {report['ratio_b_over_a_median']:.2f})"
        f"   d/c = {report['ratio_d_over_c']:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
