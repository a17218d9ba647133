"""`iiot run --role api --workers N`: N API processes sharing one HTTP port.

Each worker is a plain `iiot run --role api` child with `IIOT_HTTP_REUSE_PORT=1`, so all
of them bind the same port with SO_REUSEPORT and the kernel spreads connections among
them. The first worker starts alone (it creates the schema and the first administrator);
the others follow once it listens. SIGTERM/SIGINT stop every worker gracefully. If a
worker dies, the others are stopped and the command fails, so that the service manager
(systemd `Restart=`) restarts the whole group cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

from iiot.config import Settings
from iiot.errors import ConfigError, IIoTError

__all__ = ["run_workers"]

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 30.0


def _listening(host: str, port: int) -> bool:
    target = "127.0.0.1" if host in ("0.0.0.0", "") else host
    with contextlib.suppress(OSError), socket.create_connection((target, port), timeout=0.5):
        return True
    return False


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("worker %d did not stop in %.0f s; killed", child.pid, _STOP_TIMEOUT_S)
            child.kill()
            child.wait()


def run_workers(settings: Settings, role: str, workers: int) -> None:
    """Run `workers` API processes until SIGTERM/SIGINT; raise if one of them fails."""
    if role != "api":
        raise ConfigError(
            f"--workers {workers} needs --role api (ingestion runs in one process per host)"
        )
    if not settings.http_port:
        raise ConfigError("--workers needs an HTTP port: IIOT_HTTP_PORT is 0")
    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    env = {**os.environ, "IIOT_HTTP_REUSE_PORT": "1"}
    command = [sys.executable, "-m", "iiot", "run", "--role", "api"]
    children: list[subprocess.Popen[bytes]] = []
    try:
        children.append(subprocess.Popen(command, env=env))
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _listening(settings.bind_host, settings.http_port):
            if stopping:
                return
            if children[0].poll() is not None:
                raise IIoTError(f"the first API worker exited with code {children[0].returncode}")
            if time.monotonic() > deadline:
                raise IIoTError(f"the first API worker did not listen in {_START_TIMEOUT_S:.0f} s")
            time.sleep(0.1)
        children += [subprocess.Popen(command, env=env) for _ in range(workers - 1)]
        log.info("%d API workers on port %d", workers, settings.http_port)
        while not stopping:
            for index, child in enumerate(children):
                if child.poll() is not None:
                    raise IIoTError(
                        f"API worker {index + 1} (pid {child.pid}) exited with code "
                        f"{child.returncode}; stopped the others"
                    )
            time.sleep(0.2)
    finally:
        _stop(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
