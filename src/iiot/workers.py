"""`iiot run --role api|ingest --workers N`: N processes sharing the platform's ports.

Each worker is a plain `iiot run --role ROLE` child with `IIOT_HTTP_REUSE_PORT=1`, so all
of them bind the same port with SO_REUSEPORT and the kernel spreads connections among
them.

Ingest workers (PostgreSQL only) share the load of every protocol, each worker knowing its
number through `IIOT_WORKER_INDEX`: CoAP binds the same UDP port (SO_REUSEPORT, see
`iiot.listen`); an external MQTT broker is read through a shared subscription
(`IIOT_MQTT_SHARED_GROUP`, `iiot` unless set; one persistent session per worker); AMQP
workers are competing consumers of the one `telemetry` queue. The OPC UA server and the
embedded MQTT broker keep state of their own and run in worker 1 only; the live bridge
(PostgreSQL NOTIFY) brings every worker's values to worker 1's OPC UA address space.

The first worker starts alone (it creates the schema and the first administrator);
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


def worker_env(settings: Settings, role: str, index: int) -> dict[str, str]:
    """The environment of worker `index` (1..N) of a role."""
    env = {**os.environ, "IIOT_HTTP_REUSE_PORT": "1"}
    if role != "ingest":
        return env
    env["IIOT_WORKER_INDEX"] = str(index)
    if settings.mqtt_url and not settings.mqtt_shared_group:
        env["IIOT_MQTT_SHARED_GROUP"] = "iiot"
    if index > 1:
        env["IIOT_OPCUA_PORT"] = "0"  # one address space per host, fed by the live bridge
        if not settings.mqtt_url:
            env["IIOT_MQTT_PORT"] = "0"  # the embedded broker's sessions live in one process
    return env


def run_workers(settings: Settings, role: str, workers: int) -> None:
    """Run `workers` processes of a role until SIGTERM/SIGINT; raise if one of them fails."""
    if role not in ("api", "ingest"):
        raise ConfigError(f"--workers {workers} needs --role api or --role ingest")
    if role == "ingest" and not settings.uses_postgres:
        raise ConfigError(
            f"--role ingest --workers {workers} needs PostgreSQL (IIOT_DATABASE_URL): "
            "SQLite takes one writing process"
        )
    if not settings.http_port:
        raise ConfigError("--workers needs an HTTP port: IIOT_HTTP_PORT is 0")
    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    command = [sys.executable, "-m", "iiot", "run", "--role", role]
    children: list[subprocess.Popen[bytes]] = []
    try:
        children.append(subprocess.Popen(command, env=worker_env(settings, role, 1)))
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _listening(settings.bind_host, settings.http_port):
            if stopping:
                return
            if (code := children[0].poll()) is not None:
                raise IIoTError(f"the first {role} worker exited with code {code}")
            if time.monotonic() > deadline:
                raise IIoTError(
                    f"the first {role} worker did not listen in {_START_TIMEOUT_S:.0f} s"
                )
            time.sleep(0.1)
        children += [
            subprocess.Popen(command, env=worker_env(settings, role, index))
            for index in range(2, workers + 1)
        ]
        log.info("%d %s workers on port %d", workers, role, settings.http_port)
        while not stopping:
            for index, child in enumerate(children):
                if child.poll() is not None:
                    raise IIoTError(
                        f"{role} worker {index + 1} (pid {child.pid}) exited with code "
                        f"{child.returncode}; stopped the others"
                    )
            time.sleep(0.2)
    finally:
        _stop(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
