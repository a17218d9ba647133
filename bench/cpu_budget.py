"""What ingest ratio a given CPU cost allows: bench_commands' ingest burst, alternated
without and with a neutral load in place of the commands.

The neutral load is a process that burns a fixed share of one core (busy for that share
of every 10 ms, asleep for the rest) and does nothing else: no locks, no database, no
event loop in common with the platform. If a load of the CPU that 100 commands/s cost
lowers the burst as much as the commands do, the commands' ratio is set by the CPU they
take on the shared cores, not by getting in the ingest's way. A diagnostic, not one of
`make bench`'s benchmarks (docs/performance.md, Commands).

    .venv/bin/python -m bench.cpu_budget --cores 0.15 0.3 0.65
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import tempfile
import time
from multiprocessing.synchronize import Event
from pathlib import Path

from bench.bench_commands import (
    _devices,
    _ingest,
    admin_client,
    platform_env,
    start_platform,
)
from bench.pg import temporary_database
from bench.profiles import platform_ports, settled

PUBLISHERS, PER = 500, 120  # as bench_commands
PERIOD_S = 0.01


def _burn(share: float, stop: Event) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        while time.perf_counter() - started < PERIOD_S * share:
            pass
        time.sleep(PERIOD_S * (1 - share))


async def _with_load(url: str, port: int, publishers: list[dict[str, str]], share: float) -> float:
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    burner = context.Process(target=_burn, args=(share, stop))
    burner.start()
    try:
        await asyncio.sleep(0.5)  # started and burning
        return await _ingest(url, port, publishers, PER)
    finally:
        stop.set()
        burner.join(10)


async def _run(shares: list[float], rounds: int) -> None:
    async with temporary_database() as url:
        ports = platform_ports("defaults")
        http_port, mqtt_port = int(ports["IIOT_HTTP_PORT"]), int(ports["IIOT_MQTT_PORT"])
        proc = start_platform(
            platform_env(url, ports, Path(tempfile.mkdtemp(prefix="iiot-cpu-budget-")))
        )
        try:
            async with admin_client(http_port) as (client, admin):
                publishers = await _devices(client, admin, PUBLISHERS)
            await settled(proc.pid)
            await _ingest(url, mqtt_port, publishers, PER)  # makes every series first
            for share in shares:
                without: list[float] = []
                loaded: list[float] = []
                for _ in range(rounds):
                    without.append(await _ingest(url, mqtt_port, publishers, PER))
                    loaded.append(await _with_load(url, mqtt_port, publishers, share))
                print(
                    f"{share:.2f} of a core: without {[round(r) for r in without]},"
                    f" with {[round(r) for r in loaded]} points/s;"
                    f" ratio of the bests {max(loaded) / max(without):.3f}",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    """Print one line per load."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cores", type=float, nargs="+", default=[0.15, 0.3, 0.65])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not all(0 < share < 1 for share in args.cores):
        parser.error("each --cores value is a share of one core, between 0 and 1")
    asyncio.run(_run(args.cores, args.rounds))


if __name__ == "__main__":
    main()
