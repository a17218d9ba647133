"""The platform configurations the benchmarks run, and `iiot run --workers N` as a process.

`defaults` is `iiot run` as users run it: every protocol on (HTTP, the embedded MQTT
endpoint, CoAP, OPC UA), each on a free port so that a benchmark never collides with a
service of the machine (1883 included: benchmarks that read a private Mosquitto move the
embedded endpoint out of its way). `opcua_off` is the same platform with OPC UA turned off,
the row beside it wherever OPC UA could cost ingest capacity.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "PROFILES",
    "die_with_parent",
    "drain_rate",
    "free_port",
    "platform_ports",
    "worker_group",
]

PROFILES = ("defaults", "opcua_off")
PROFILE_LABELS = {"defaults": "defaults (every protocol on)", "opcua_off": "OPC UA off"}


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port nobody listens on now (TCP or UDP)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def platform_ports(profile: str = "defaults") -> dict[str, str]:
    """`IIOT_*` port settings of a profile: every protocol on a free port; OPC UA off or not."""
    env = {
        "IIOT_BIND_HOST": "127.0.0.1",
        "IIOT_HTTP_PORT": str(free_port()),
        "IIOT_MQTT_PORT": str(free_port()),
        "IIOT_COAP_PORT": str(free_port(socket.SOCK_DGRAM)),
        "IIOT_OPCUA_PORT": str(free_port()),
    }
    if profile == "opcua_off":
        env["IIOT_OPCUA_PORT"] = "0"
    elif profile != "defaults":
        raise ValueError(f"unknown profile {profile!r}")
    return env


def die_with_parent() -> None:
    """`preexec_fn` of a benchmark's child processes: SIGTERM when the benchmark dies
    (run_all kills a module that overruns), so no broker or worker outlives it."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def worker_group(
    env: dict[str, str], workers: int, log: Path, *, wait_ready: bool = True
) -> Iterator[list[int]]:
    """N ingest workers, each `iiot run --role ingest` with the environment
    `iiot run --role ingest --workers N` gives it (`iiot.workers.worker_env`), all started
    at once (`--workers` starts the first alone, to create the schema: here it exists), so
    that they drain a backlog together. Yields once every worker answers /readyz (at once
    with `wait_ready=False`, for timing a drain from its first commit); stopped with
    SIGTERM afterwards."""
    from iiot.config import load_settings
    from iiot.workers import worker_env

    settings = load_settings(env)
    port = int(env["IIOT_HTTP_PORT"])
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with log.open("ab") as out:
            for index in range(1, workers + 1):
                child_env = {**os.environ, **env}
                if workers > 1:
                    with _patched_environ(child_env):
                        child_env = worker_env(settings, "ingest", index)
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "iiot", "run", "--role", "ingest"],
                        env=child_env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        preexec_fn=die_with_parent,
                    )
                )
        deadline = time.monotonic() + 120
        ready = 0
        while (
            wait_ready and ready < 5 * workers
        ):  # several answers in a row: the kernel spreads them
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"an ingest worker exited ({proc.returncode}); see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the ingest workers were not ready in 120 s; see {log}")
            ready = ready + 1 if _ready(port) else 0
            time.sleep(0.02 if ready else 0.1)
        yield [proc.pid for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def _patched_environ(env: dict[str, str]) -> Iterator[None]:
    """`worker_env` starts from os.environ: give it the group's environment."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


async def drain_rate(db_url: str, expected: int, timeout_s: float = 180) -> float:
    """Points/s of a backlog being drained into `telemetry`, from the first commit seen to
    the last point (start-up left out): polls count(*) every 0.1 s."""
    import asyncio

    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        deadline = time.monotonic() + timeout_s
        first: tuple[float, int] | None = None
        rows = 0
        while rows < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {rows} of {expected} points stored")
            rows = int(await conn.fetchval("SELECT count(*) FROM telemetry"))
            if first is None and rows:
                first = (time.perf_counter(), rows)
            if rows < expected:
                await asyncio.sleep(0.1)
        assert first is not None
        elapsed = time.perf_counter() - first[0]
        if elapsed <= 0 or rows == first[1]:
            raise RuntimeError("the backlog was drained before it could be timed: make it larger")
        return (rows - first[1]) / elapsed
    finally:
        await conn.close()


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def settled(pid: int, busy_below: float = 0.1, timeout_s: float = 60.0) -> None:
    """Wait until the process uses less than `busy_below` of a core over half a second:
    work set off by the set-up (e.g. OPC UA nodes for a thousand new devices) is done, so
    a timed phase measures the steady state."""
    import asyncio

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = process_cpu_s(pid)
        await asyncio.sleep(0.5)
        if (process_cpu_s(pid) - before) / 0.5 < busy_below:
            return
