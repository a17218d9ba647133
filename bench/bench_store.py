"""Storage write throughput: the store and the ingest pipeline beside the raw database limits.

    .venv/bin/python -m bench.bench_store [--quick] [--points N] [--batch N] [--repeat N]
                                          [--inflight N] [--json PATH]

The data: a fleet of DEVICES devices, each sending KEYS points per message (one tick), as
many messages as make --points points. Figures (points/s), each beside the raw limit
measured in the same run on identical rows:
  PostgreSQL
    raw      asyncpg COPY of the rows into a table shaped like `telemetry` (same columns,
             primary key and checks), one COPY and commit per batch of --batch points;
    raw parallel  the same COPYs spread over as many connections as the pipeline has
             writers (IIOT_BATCH_WRITERS), all at once: the limit for that parallelism;
    store    `PostgresStore.write_points` of the same batches, one after the other;
    pipeline `iiot.pipeline.Pipeline` over `PostgresStore` (max batch --batch points): every
             message is queued the way the MQTT adapter queues it (`enqueue` with a
             completion callback, where the adapter acks), timed until every callback has
             been called (that is, until every point is committed);
    submit   the same through `submit`, one asyncio task per message, as the HTTP and CoAP
             handlers call it (their own task per request is part of that cost);
  SQLite
    raw      sqlite3 `executemany` of every row in one transaction (WAL);
    store    `SqliteStore.write_points` of the same batches;
    pipeline `Pipeline` over `SqliteStore`, as for PostgreSQL.
PostgreSQL runs in a fresh `iiot_bench_*` database on IIOT_BENCH_DATABASE_URL (default: the
local server), dropped afterwards; the fleet's series are written once before anything is
timed (steady state: every series has its latest-value row, registered with its first
point), and only `telemetry` is emptied between runs; synchronous_commit keeps the
server's setting (on). Each figure runs --repeat times, alternating with its raw
counterpart so that load from other programs hits both alike; the best run of each is
reported (the median too, in the details). The goal is judged against the raw limit of
issue 2 (one connection); the parallel one is printed beside it.
Pipeline settings other than the batch size come from the platform's configuration (IIOT_*);
the garbage collector is tuned as in every `iiot run` process (iiot.runtime).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg

from bench.figures import throughput
from bench.pg import temporary_database
from iiot.bus import LiveBus
from iiot.config import load_settings
from iiot.metrics import Metrics
from iiot.model import Device, DevicePoints, Point
from iiot.pipeline import Pipeline, PipelineSettings
from iiot.runtime import tune_garbage_collector
from iiot.storage._common import Row, batch_rows, dedup_rows
from iiot.storage.postgres import PostgresStore
from iiot.storage.sqlite import SqliteStore

__all__ = ["main", "measure", "run"]

DEVICES = 1000
KEYS = 3  # points per message
GOAL_PG_PIPELINE = 0.70  # issue 2: the pipeline reaches 70% of the raw limit on PostgreSQL
FULL = {"points": 150_000, "batch_size": 5000, "repeat": 3}
QUICK = {"points": 60_000, "batch_size": 5000, "repeat": 2}

Batch = list[DevicePoints]


def make_messages(points: int, devices: Sequence[Device]) -> list[DevicePoints]:
    """Messages as a fleet sends them: every device's KEYS points at each tick, tick by tick."""
    rng = random.Random(42)
    keys = [f"sensor_{k}" for k in range(KEYS)]
    start = 1_767_225_600_000
    messages: list[DevicePoints] = []
    count = 0
    tick = 0
    while count < points:
        ts = start + tick * 1000
        for device in devices:
            n = min(KEYS, points - count)
            if n <= 0:
                break
            values: list[Point] = []
            for key in keys[:n]:
                # Mostly floats, as field data is; some ints and booleans.
                r = rng.random()
                value: float | int | bool = (
                    round(rng.uniform(0, 100), 3)
                    if r < 0.8
                    else rng.randrange(1000)
                    if r < 0.95
                    else r < 0.975
                )
                values.append(Point(key, ts, value))
            messages.append(DevicePoints(device, tuple(values)))
            count += n
        tick += 1
    return messages


def cut_batches(messages: Sequence[DevicePoints], batch_size: int) -> list[Batch]:
    """Whole messages into batches of at most `batch_size` points, as the pipeline cuts them."""
    batches: list[Batch] = []
    current: Batch = []
    size = 0
    for message in messages:
        n = len(message.points)
        if current and size + n > batch_size:
            batches.append(current)
            current, size = [], 0
        current.append(message)
        size += n
    if current:
        batches.append(current)
    return batches


def _pipeline_settings(batch_size: int) -> PipelineSettings:
    """The platform's configured pipeline settings (IIOT_*), with our batch size."""
    s = load_settings()
    configured = PipelineSettings(
        max_batch_points=s.batch_max_points,
        max_delay_s=s.batch_max_delay_ms / 1000,
        queue_max_points=s.queue_max_points,
        commit_timeout_s=s.commit_timeout_s,
        writers=s.batch_writers,
    )
    return replace(configured, max_batch_points=batch_size)


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


async def _enqueue_all(pipeline: Pipeline, messages: Sequence[DevicePoints]) -> None:
    """Every message queued as the MQTT adapter queues it (`enqueue` with a completion
    callback, no task per message); returns when every one is committed."""
    remaining = len(messages)
    all_done = asyncio.Event()
    errors: list[BaseException] = []

    def on_done(error: BaseException | None) -> None:  # the adapter acks here
        nonlocal remaining
        if error is not None:
            errors.append(error)
        remaining -= 1
        if remaining == 0:
            all_done.set()

    for i, m in enumerate(messages):
        if not pipeline.enqueue(m, "bench", on_done):  # queue full: wait for space
            await pipeline.submit(m, "bench")
            on_done(None)
        if i % 500 == 499:
            await asyncio.sleep(0)  # a broker client hands over messages in bursts
    await all_done.wait()
    if errors:
        raise RuntimeError(f"{len(errors)} messages not committed: {errors[0]}")


async def _submit_all(pipeline: Pipeline, messages: Sequence[DevicePoints], inflight: int) -> None:
    """Every message through `submit`; `inflight` > 0: at most that many per device at once."""
    if inflight <= 0:
        await asyncio.gather(*(pipeline.submit(m, "bench") for m in messages))
        return
    per_device: dict[uuid.UUID, list[DevicePoints]] = {}
    for m in messages:
        per_device.setdefault(m.device.id, []).append(m)

    async def sender(own: list[DevicePoints]) -> None:
        # A device waiting for each acknowledgement before its next message.
        for m in own:
            await pipeline.submit(m, "bench")

    await asyncio.gather(
        *(sender(own[i::inflight]) for own in per_device.values() for i in range(inflight))
    )


async def pipeline_once(
    store: PostgresStore | SqliteStore,
    messages: Sequence[DevicePoints],
    settings: PipelineSettings,
    inflight: int | None,
) -> float:
    """Seconds from the first message queued until every one is committed.

    `inflight` None: `enqueue` (the MQTT adapter's fast path); otherwise `submit` (see
    `_submit_all`).
    """
    async with Pipeline(store, LiveBus(), Metrics(), settings) as pipeline:
        began = time.perf_counter()
        if inflight is None:
            await _enqueue_all(pipeline, messages)
        else:
            await _submit_all(pipeline, messages, inflight)
        return time.perf_counter() - began


# --- PostgreSQL ----------------------------------------------------------------------------
async def _pg_empty(url: str, *tables: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"TRUNCATE {', '.join(tables)}")
        await conn.execute("CHECKPOINT")  # no run pays for the previous run's dirty pages
    finally:
        await conn.close()


async def pg_raw_copy_once(url: str, chunks: list[list[Row]]) -> float:
    """Raw limit: COPY each chunk (one transaction each) into a fresh telemetry-shaped table."""
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


async def pg_raw_copy_parallel_once(url: str, chunks: list[list[Row]], connections: int) -> float:
    """Raw limit with the pipeline's parallelism: the chunks COPYed over `connections`
    connections at once (each chunk one transaction), into a fresh telemetry-shaped table."""
    setup = await asyncpg.connect(url)
    conns = [await asyncpg.connect(url) for _ in range(connections)]
    try:
        await setup.execute("DROP TABLE IF EXISTS raw_telemetry")
        await setup.execute("CREATE TABLE raw_telemetry (LIKE telemetry INCLUDING ALL)")
        await setup.execute("CHECKPOINT")

        async def copy_every_nth(conn: Any, first: int) -> None:
            for chunk in chunks[first::connections]:
                await conn.copy_records_to_table("raw_telemetry", records=chunk)

        began = time.perf_counter()
        await asyncio.gather(*(copy_every_nth(c, i) for i, c in enumerate(conns)))
        return time.perf_counter() - began
    finally:
        for conn in conns:
            await conn.close()
        await setup.execute("DROP TABLE IF EXISTS raw_telemetry")
        await setup.close()


async def pg_store_once(store: PostgresStore, url: str, batches: list[Batch]) -> float:
    """`PostgresStore.write_points` of every batch, one after the other, into an empty
    telemetry table (the fleet's series and latest values exist, as in steady state)."""
    await _pg_empty(url, "telemetry")
    began = time.perf_counter()
    for b in batches:
        await store.write_points(b)
    return time.perf_counter() - began


async def bench_postgres(
    points: int, batch_size: int, repeat: int, inflight: int, progress: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Raw COPY, write_points and the pipeline, run in turn `repeat` times."""
    settings = _pipeline_settings(batch_size)
    async with temporary_database() as url, PostgresStore(url) as store:
        messages = make_messages(points, await _devices(store))
        batches = cut_batches(messages, batch_size)
        # Identical rows for the raw COPY: what the store writes, already deduplicated.
        chunks = [dedup_rows(batch_rows(b).rows) for b in batches]
        # Steady state, as on a running platform: the fleet's series are known and have
        # their latest-value rows before anything is timed (a series is registered once,
        # with its first point). Between runs only `telemetry` is emptied.
        for b in batches:
            await store.write_points(b)
        runs: dict[str, list[float]] = {
            "raw": [], "raw_parallel": [], "store": [], "pipeline": [], "submit": []
        }  # fmt: skip
        for i in range(repeat):
            progress(f"postgres round {i + 1}/{repeat}: raw COPY")
            runs["raw"].append(await pg_raw_copy_once(url, chunks))
            progress(f"postgres round {i + 1}/{repeat}: raw COPY, {settings.writers} connections")
            runs["raw_parallel"].append(
                await pg_raw_copy_parallel_once(url, chunks, settings.writers)
            )
            progress(f"postgres round {i + 1}/{repeat}: write_points")
            runs["store"].append(await pg_store_once(store, url, batches))
            progress(f"postgres round {i + 1}/{repeat}: pipeline")
            await _pg_empty(url, "telemetry")
            runs["pipeline"].append(await pipeline_once(store, messages, settings, None))
            progress(f"postgres round {i + 1}/{repeat}: pipeline through submit")
            await _pg_empty(url, "telemetry")
            runs["submit"].append(await pipeline_once(store, messages, settings, inflight))
    extra = {"batches": len(batches), "batch_size": batch_size}
    return {
        "pg_raw": _summary("pg_raw_copy_per_batch", points, runs["raw"], **extra),
        "pg_raw_parallel": _summary(
            "pg_raw_copy_parallel",
            points,
            runs["raw_parallel"],
            connections=settings.writers,
            **extra,
        ),
        "pg_store": _summary("pg_store_write_points", points, runs["store"], **extra),
        "pg_pipeline": _summary(
            "pg_pipeline",
            points,
            runs["pipeline"],
            messages=len(messages),
            writers=settings.writers,
        ),
        "pg_pipeline_submit": _summary(
            "pg_pipeline_submit", points, runs["submit"], messages=len(messages), inflight=inflight
        ),
    }


# --- SQLite --------------------------------------------------------------------------------
def sqlite_raw_once(path: Path, params: list[tuple[Any, ...]]) -> float:
    """Raw limit: sqlite3 executemany of every row in one transaction, same table shape."""
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


async def sqlite_template(folder: Path) -> tuple[Path, list[Device]]:
    """A store file holding the fleet, copied for every run (creating 1,000 devices is slow)."""
    path = folder / "template.db"
    async with SqliteStore(path) as store:
        devices = await _devices(store)
    # Closing the last connection checkpointed the WAL into the file.
    return path, devices


def _copy(template: Path, path: Path) -> Path:
    for suffix in ("", "-wal"):
        if Path(f"{template}{suffix}").exists():
            shutil.copyfile(f"{template}{suffix}", f"{path}{suffix}")
    return path


async def sqlite_store_once(path: Path, batches: list[Batch]) -> float:
    """`SqliteStore.write_points` of every batch, one after the other, in a new copy."""
    async with SqliteStore(path) as store:
        began = time.perf_counter()
        for b in batches:
            await store.write_points(b)
        return time.perf_counter() - began


async def sqlite_pipeline_once(
    path: Path,
    messages: Sequence[DevicePoints],
    settings: PipelineSettings,
    inflight: int | None,
) -> float:
    """The pipeline over `SqliteStore`, in a new copy."""
    async with SqliteStore(path) as store:
        return await pipeline_once(store, messages, settings, inflight)


async def bench_sqlite(
    points: int, batch_size: int, repeat: int, inflight: int, progress: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Raw executemany, write_points and the pipeline, run in turn `repeat` times."""
    settings = _pipeline_settings(batch_size)
    runs: dict[str, list[float]] = {"raw": [], "store": [], "pipeline": [], "submit": []}
    with tempfile.TemporaryDirectory(prefix="iiot-bench-") as tmp:
        folder = Path(tmp)
        template, devices = await sqlite_template(folder)
        messages = make_messages(points, devices)
        batches = cut_batches(messages, batch_size)
        params = [(r[0].bytes, *r[1:]) for b in batches for r in dedup_rows(batch_rows(b).rows)]
        for i in range(repeat):
            progress(f"sqlite round {i + 1}/{repeat}: raw executemany")
            runs["raw"].append(sqlite_raw_once(folder / f"raw{i}.db", params))
            progress(f"sqlite round {i + 1}/{repeat}: write_points")
            runs["store"].append(
                await sqlite_store_once(_copy(template, folder / f"store{i}.db"), batches)
            )
            progress(f"sqlite round {i + 1}/{repeat}: pipeline")
            path = _copy(template, folder / f"pipe{i}.db")
            runs["pipeline"].append(await sqlite_pipeline_once(path, messages, settings, None))
            progress(f"sqlite round {i + 1}/{repeat}: pipeline through submit")
            path = _copy(template, folder / f"submit{i}.db")
            runs["submit"].append(await sqlite_pipeline_once(path, messages, settings, inflight))
    return {
        "sqlite_raw": _summary("sqlite_raw_executemany_one_tx", points, runs["raw"]),
        "sqlite_store": _summary(
            "sqlite_store_write_points",
            points,
            runs["store"],
            batches=len(batches),
            batch_size=batch_size,
        ),
        "sqlite_pipeline": _summary(
            "sqlite_pipeline", points, runs["pipeline"], messages=len(messages)
        ),
        "sqlite_pipeline_submit": _summary(
            "sqlite_pipeline_submit",
            points,
            runs["submit"],
            messages=len(messages),
            inflight=inflight,
        ),
    }


# --- the result ----------------------------------------------------------------------------
def _figure(
    label: str, value: dict[str, Any], baseline_label: str, baseline: dict[str, Any]
) -> dict[str, Any]:
    return {
        **throughput(label, value["points_per_s"], baseline_label, baseline["points_per_s"]),
        # Same points, so the ratio of one round is baseline seconds / figure seconds.
        "round_ratios": [
            round(b / v, 2) for v, b in zip(value["runs_s"], baseline["runs_s"], strict=True)
        ],
    }


def _progress(text: str) -> None:
    print(text, flush=True)  # run_all shows the last line of the log as progress


async def measure(
    points: int,
    batch_size: int,
    repeat: int,
    inflight: int = 0,
    progress: Callable[[str], None] = _progress,
) -> dict[str, Any]:
    """Every storage figure beside its raw limit, in the result shape of bench/README.md."""
    tune_garbage_collector()  # as `iiot run` does for every platform process
    d = {
        **await bench_postgres(points, batch_size, repeat, inflight, progress),
        **await bench_sqlite(points, batch_size, repeat, inflight, progress),
    }
    how = (
        "every message submitted at once"
        if inflight <= 0
        else f"{inflight} message(s) in flight per device"
    )
    fleet = f"{DEVICES:,} devices x {KEYS} points"
    pg_raw = f"asyncpg COPY, identical rows, 1 tx per {batch_size:,} points"
    writers = _pipeline_settings(batch_size).writers
    pg_raw_parallel = f"the same COPY over {writers} connections at once"
    sqlite_raw = "sqlite3 executemany, identical rows, 1 transaction"
    figures = [
        _figure(f"PG write_points, {batch_size:,}-point batches", d["pg_store"],
                pg_raw, d["pg_raw"]),
        _figure(f"PG pipeline, {fleet}", d["pg_pipeline"], pg_raw, d["pg_raw"]),
        _figure(f"PG pipeline, {fleet}", d["pg_pipeline"], pg_raw_parallel,
                d["pg_raw_parallel"]),
        _figure(f"PG pipeline through submit, {fleet}", d["pg_pipeline_submit"], pg_raw,
                d["pg_raw"]),
        _figure(f"SQLite write_points, {batch_size:,}-point batches", d["sqlite_store"],
                sqlite_raw, d["sqlite_raw"]),
        _figure(f"SQLite pipeline, {fleet}", d["sqlite_pipeline"], sqlite_raw,
                d["sqlite_raw"]),
        _figure(f"SQLite pipeline through submit, {fleet}", d["sqlite_pipeline_submit"],
                sqlite_raw, d["sqlite_raw"]),
    ]  # fmt: skip
    # Issue 2's raw limit: COPY of identical rows, a transaction per batch, one connection.
    pipeline_ratio, parallel_ratio = figures[1]["ratio"], figures[2]["ratio"]
    verdict = "met" if pipeline_ratio >= GOAL_PG_PIPELINE else "NOT met"
    notes = [
        f"{points:,} points per figure, best of {repeat} runs alternating with the raw limit;"
        " ratio within each round (in the order of the figures): "
        + "; ".join(", ".join(map(str, f["round_ratios"])) for f in figures)
        + ".",
        f"Goal (pipeline >= {GOAL_PG_PIPELINE:.0%} of the PostgreSQL raw limit, asyncpg COPY"
        f" of identical rows, one transaction per batch): {verdict} ({pipeline_ratio:.0%})."
        f" Against the same COPYs over {writers} connections at once, the pipeline's own"
        f" parallelism: {parallel_ratio:.0%}.",
        f"Pipeline: every {KEYS}-point message queued as the MQTT adapter queues it"
        f" (`enqueue` with a completion callback per message), {writers} writers,"
        " timed until every point is committed. Through submit: one `submit` per message,"
        f" {how} (an asyncio task per message, as HTTP and CoAP handlers have)."
        " write_points: PostgresStore/SqliteStore.write_points, one batch after the other."
        " The raw limits skip the store's device check and latest-value upkeep.",
    ]
    return {
        "name": "store",
        "figures": figures,
        "notes": notes,
        "params": {
            "points": points,
            "batch_size": batch_size,
            "repeat": repeat,
            "devices": DEVICES,
            "points_per_message": KEYS,
            "inflight_per_device": inflight,
        },
        "details": d,
        "environment": {
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "sqlite": sqlite3.sqlite_version,
            "load_average_at_end": os.getloadavg(),
        },
    }


def run(quick: bool = False) -> dict[str, Any]:
    """The storage benchmark with its standard sizes (`quick`: smaller, fewer runs)."""
    sizes = QUICK if quick else FULL
    return asyncio.run(measure(sizes["points"], sizes["batch_size"], sizes["repeat"]))


def _print(report: dict[str, Any]) -> None:
    for key, fig in report["details"].items():
        print(
            f"{key:16} {fig['points_per_s']:>10,} points/s best"
            f"  {fig['median_points_per_s']:>10,} median  runs {fig['runs_s']} s"
        )
    for f in report["figures"]:
        print(
            f"{f['label']}: {f['value']:,} {f['unit']} / {f['baseline_value']:,}"
            f" ({f['baseline_label']}) = {f['ratio']:.2f}"
        )
    for note in report["notes"]:
        print(f"- {note}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the storage benchmark and print (and optionally save) its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick sizes of run(quick=True)")
    parser.add_argument(
        "--points", type=int, help=f"points per figure (default {FULL['points']:,})"
    )
    parser.add_argument("--batch", type=int, help="points per write_points / pipeline batch")
    parser.add_argument("--repeat", type=int, help="runs per figure (best is kept)")
    parser.add_argument(
        "--inflight",
        type=int,
        default=0,
        help="pipeline: messages in flight per device (default 0: all submitted at once)",
    )
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    args = parser.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    for key, given in (("points", args.points), ("batch_size", args.batch),
                       ("repeat", args.repeat)):  # fmt: skip
        if given is not None:
            sizes[key] = given
    report = asyncio.run(
        measure(sizes["points"], sizes["batch_size"], sizes["repeat"], args.inflight)
    )
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
