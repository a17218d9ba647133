"""Web console: device page load, post-to-pixel latency, ingest with 100 live viewers.

What it does, on loopback and bounded in time:
1. seeds a throwaway PostgreSQL database with the REST load test's fixture (bench_api:
   1,000 devices x 4 keys x 2,500 points = 10 million points over 25 hours, generated
   inside PostgreSQL; `--quick`: 1 million);
2. starts `python -m iiot run` on it as users run it (every protocol on, free ports) and the
   system's Chromium through Playwright;
3. opens a device page (24 h chart of 4 keys) again and again and reads, in the browser, the
   time from navigation start to the chart drawn (Performance API mark set by the chart);
4. on that page, posts a value over the device HTTP API from the page itself and times until
   the value is painted in the latest-values table (the next animation frame after it shows);
5. measures HTTP ingest throughput (wrk posting for 16 devices, bench/wrk/telemetry.lua) with
   no live viewer, then with 100 WebSocket clients subscribed to every device's telemetry,
   alternated, in the same run (ratio: goal >= 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from bench.bench_api import PASSWORD, Params, _db_url, _drop_database, _seed
from bench.figures import throughput
from bench.profiles import die_with_parent, platform_ports

__all__ = ["main", "run"]

GOAL_MS = 500.0
# Ingest load: enough concurrent senders that the platform, not round trips, is the limit.
SENDERS = 16  # devices posting (wrk uses two connections for each)
POINTS_PER_POST = 200  # bench/wrk/telemetry.lua: 100 items of 2 keys
TELEMETRY_SCRIPT = Path(__file__).resolve().parent / "wrk" / "telemetry.lua"
_TS_BLOCKS = itertools.count()  # each ingest run writes its own timestamps
FULL = Params()
QUICK = Params(devices=200, points_per_series=1250, step_ms=72_000)


def _say(text: str) -> None:
    print(f"[console bench] {text}", file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def _platform(db_url: str) -> AsyncIterator[str]:
    ports = platform_ports("defaults")
    port = int(ports["IIOT_HTTP_PORT"])
    env = {
        **os.environ,
        **ports,
        "IIOT_DATABASE_URL": db_url,
        "IIOT_DATA_DIR": tempfile.mkdtemp(prefix="iiot-bench-console-"),
        "IIOT_LOG_LEVEL": "WARNING",
    }
    env.pop("IIOT_AMQP_URL", None)
    # Stopped with this process even when run_all kills it for overrunning its time.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "iiot", "run", env=env, preexec_fn=die_with_parent
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as client:
            for _ in range(600):
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


def _p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[max(0, round(0.95 * len(ordered)) - 1)]


def _latency(label: str, samples: list[float]) -> dict[str, Any]:
    p95 = _p95(samples)
    return {
        "label": label,
        "value": round(p95, 1),
        "unit": "ms",
        "baseline_label": "goal",
        "baseline_value": GOAL_MS,
        "ratio": round(p95 / GOAL_MS, 3),
        "kind": "latency",
        "p50": round(statistics.median(samples), 1),
        "samples": len(samples),
    }


async def _browser_figures(base: str, device_id: str, token: str, loads: int, posts: int) -> Any:
    from playwright.async_api import async_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        raise RuntimeError("Chromium is not installed (apt-get install chromium)")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = await browser.new_page(viewport={"width": 1024, "height": 800})
        await page.goto(base + "/")
        await page.get_by_label("Username").fill("admin")
        await page.get_by_label("Password").fill(PASSWORD)
        await page.get_by_role("button", name="Log in").click()
        await page.get_by_role("button", name="Log out").wait_for()
        url = f"{base}/#/devices/{device_id}"
        drawn: list[float] = []
        for _ in range(loads + 2):
            await page.goto("about:blank")
            await page.goto(url)
            await page.wait_for_function(
                "() => performance.getEntriesByName('iiot:chart-drawn').length > 0", timeout=30_000
            )
            points = await page.get_attribute("#chart", "data-points")
            assert points and int(points) > 0, "the chart drew no point"
            mark = "() => performance.getEntriesByName('iiot:chart-drawn')[0].startTime"
            drawn.append(await page.evaluate(mark))
        drawn = drawn[2:]  # the first loads warm the caches
        await page.wait_for_function("() => document.querySelector('.live-dot.up') !== null")
        pixel: list[float] = []
        for i in range(posts):
            value = 1000 + i + 0.5
            pixel.append(
                await page.evaluate(
                    """async ([token, value]) => {
                      const text = String(value);
                      const seen = () => [...document.querySelectorAll('#latest td')]
                        .some((td) => td.textContent === text);
                      const shown = new Promise((resolve, reject) => {
                        setTimeout(() => reject(new Error('value not shown in 10 s')), 10000);
                        const obs = new MutationObserver(() => {
                          if (seen()) { obs.disconnect(); requestAnimationFrame(() => resolve()); }
                        });
                        obs.observe(document.querySelector('#latest'),
                                    { childList: true, subtree: true, characterData: true });
                      });
                      const t0 = performance.now();
                      await fetch(`/api/v1/${token}/telemetry`, { method: 'POST',
                        headers: { 'Content-Type': 'application/json' },
                        body: JSON.stringify({ bench_live: value }) });
                      await shown;
                      return performance.now() - t0;
                    }""",
                    [token, value],
                )
            )
            await asyncio.sleep(0.05)
        await browser.close()
    return drawn, pixel


async def _ingest_rate(base: str, tokens: list[str], seconds: float) -> float:
    """Points/s acknowledged by the device HTTP API under wrk (bench/wrk/telemetry.lua):
    a load generator in C, so the platform, not the client, is what is measured."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed: apt-get install -y wrk")
    first_ts = int(time.time() * 1000) - 30 * 86_400_000 + next(_TS_BLOCKS) * 10**10
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as listing:
        listing.write("\n".join(tokens) + "\n")
        listing.flush()
        done = await asyncio.to_thread(
            subprocess.run,
            [
                wrk,
                "-t2",
                f"-c{SENDERS * 2}",
                f"-d{int(seconds)}s",
                "-s",
                str(TELEMETRY_SCRIPT),
                base,
                "--",
                listing.name,
                str(first_ts),
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
    match = re.search(r"^WRK_RESULT (\{.*\})$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-800:]} {done.stderr}")
    result = json.loads(match.group(1))
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} telemetry posts failed under wrk")
    return float(result["requests"] * POINTS_PER_POST / (result["duration_us"] / 1e6))


_VIEWERS = """
import asyncio, json, sys
import websockets

async def main(url, jwt, count):
    async def viewer():
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "auth", "token": jwt}))
            await ws.recv()
            await ws.send(json.dumps(
                {"type": "subscribe", "topics": ["telemetry"], "device_id": None}))
            async for _ in ws:
                pass
    tasks = [asyncio.create_task(viewer()) for _ in range(count)]
    await asyncio.sleep(2)
    print("ready", flush=True)
    await asyncio.gather(*tasks)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


@contextlib.asynccontextmanager
async def _viewers(base: str, jwt: str, count: int) -> AsyncIterator[None]:
    """`count` live viewers reading every device's telemetry, in a process of their own
    (as browsers would be), so they do not take the load generator's CPU time."""
    url = base.replace("http", "ws", 1) + "/api/ws"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _VIEWERS, url, jwt, str(count), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.strip() == b"ready", "the live viewers did not start"
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await proc.wait()


async def _run(quick: bool) -> dict[str, Any]:
    params = QUICK if quick else FULL
    db_name = f"iiot_bench_console_{os.getpid()}"
    end_ms = int(time.time() * 1000)
    try:
        _say(f"seeding {params.points:,} points")
        tenancies, seed_s = await _seed(db_name, params, end_ms)
        _say(f"seeded in {seed_s:.0f} s; starting the platform")
        async with _platform(_db_url(db_name)) as base, httpx.AsyncClient(base_url=base) as c:
            login = await c.post(
                "/api/auth/login", json={"username": "admin", "password": PASSWORD}
            )
            jwt = login.json()["access_token"]
            auth = {"Authorization": f"Bearer {jwt}"}
            tenant_id = (await c.get("/api/tenants?limit=1", headers=auth)).json()["items"][0]["id"]
            made = [
                (
                    await c.post(
                        "/api/devices",
                        json={"name": f"bench-{i}", "tenant_id": tenant_id},
                        headers=auth,
                    )
                ).json()
                for i in range(SENDERS)
            ]
            device_id = str(tenancies[0].device_ids[0])
            rotated = await c.post(f"/api/devices/{device_id}/token", headers=auth)
            page_token = rotated.json()["token"]
            _say("browser: page loads and live values")
            drawn, pixel = await _browser_figures(
                base, device_id, page_token, 10 if quick else 30, 10 if quick else 30
            )
            tokens = [d["token"] for d in made]
            _say("ingest without and with 100 live viewers")
            seconds = 4.0 if quick else 8.0
            # Alternated, so that drift on a shared machine hits both sides alike.
            none: list[float] = []
            viewed: list[float] = []
            for _ in range(2):
                none.append(await _ingest_rate(base, tokens, seconds))
                async with _viewers(base, jwt, 100):
                    viewed.append(await _ingest_rate(base, tokens, seconds))
            none.append(await _ingest_rate(base, tokens, seconds))
    finally:
        await _drop_database(db_name)
    baseline = statistics.mean(none)
    figures = [
        _latency("device page, 24 h chart of 4 keys: navigation to drawn, p95", drawn),
        _latency("live value: HTTP post to painted on the device page, p95", pixel),
        throughput(
            "HTTP ingest with 100 live viewers (WebSocket)",
            statistics.mean(viewed),
            "no live viewer (runs alternated with those)",
            baseline,
        ),
    ]
    return {
        "name": "console",
        "figures": figures,
        "notes": [
            f"{params.points:,} stored points (seeded in {seed_s:.0f} s); goals: p95 < 500 ms,"
            " ingest ratio >= 0.9",
            "timings are read in Chromium with the Performance API",
        ],
        "params": {"points": params.points, "devices": params.devices},
        "ingest_runs": {"none": [round(v) for v in none], "viewers": [round(v) for v in viewed]},
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns its figures."""
    return asyncio.run(_run(quick))


def main(argv: list[str] | None = None) -> None:
    """Print the result (and write it as JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 million points, fewer samples")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    result = run(args.quick)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
