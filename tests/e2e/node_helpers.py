"""Platform nodes for the several-node tests: separate `iiot run` processes, as separate
machines behind a load balancer would run them (docs/scaling.md)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.amqp_support import wait_for
from tests.support import free_port, platform_env


@dataclass
class Node:
    """One platform process with its own data directory and ports."""

    env: dict[str, str]
    log: Path
    args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    http_port: int = field(init=False)
    coap_port: int = field(init=False)

    def __post_init__(self) -> None:
        self.http_port = int(self.env["IIOT_HTTP_PORT"])
        self.coap_port = int(self.env["IIOT_COAP_PORT"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "iiot", "run", *self.args],
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    async def ready(self, client: httpx.AsyncClient) -> dict[str, object]:
        """/readyz once it answers 200 (every component up)."""

        async def check() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            try:
                answer = await client.get(f"{self.url}/readyz")
            except httpx.HTTPError:
                return False
            return answer.status_code == 200

        await wait_for(check, 60, f"node {self.http_port} ready")
        answer = await client.get(f"{self.url}/readyz")
        return dict(answer.json())


def make_nodes(tmp_path: Path, pg_url: str, amqp_url: str, mqtt_port: int) -> list[Node]:
    """Three nodes on one PostgreSQL, RabbitMQ and Mosquitto, set up as docs/scaling.md says:
    `IIOT_CLUSTER=1`, and the same JWT signing key in every data directory (so that a login
    on one node is valid on the others)."""
    key = secrets.token_hex(32) + "\n"
    nodes = []
    for index in range(3):
        data = tmp_path / f"node{index}"
        data.mkdir(mode=0o700)
        fd = os.open(data / "jwt-secret", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key)
        env = platform_env(
            data,
            IIOT_DATABASE_URL=pg_url,
            IIOT_CLUSTER="1",
            IIOT_HTTP_PORT=str(free_port()),
            IIOT_COAP_PORT=str(free_port(socket.SOCK_DGRAM)),
            IIOT_MQTT_URL=f"mqtt://127.0.0.1:{mqtt_port}",
            IIOT_MQTT_SHARED_GROUP="iiot",
            IIOT_AMQP_URL=amqp_url,
            IIOT_LOG_LEVEL="INFO",
        )
        nodes.append(Node(env, data / "node.log"))
    return nodes


async def start_nodes(nodes: Sequence[Node], client: httpx.AsyncClient) -> None:
    """Start every node at once (as after a power cut) and wait until each is ready with
    every protocol and the live bridge up."""
    for node in nodes:
        node.start()
    for node in nodes:
        ready = await node.ready(client)
        for name in ("mqtt", "amqp", "coap", "livebridge"):
            assert ready["components"][name]["state"] == "up", ready  # type: ignore[index]
