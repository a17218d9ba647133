"""Helpers for the MQTT tests (no tests here): devices, paho publishers, private Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from iiot.app import Platform
from tests.support import free_port, wait_for_port

BASE_TS = 1_767_225_600_000
KEYS = ("temperature", "pressure", "running")


@dataclass(frozen=True)
class Dev:
    """A device created for a test."""

    id: str
    token: str


async def create_devices(platform: Platform, count: int, tenant: str = "acme") -> list[Dev]:
    """Create a tenant and `count` devices through the platform's registry."""
    services = platform.services
    created = await services.store.create_tenant(tenant)
    devices = []
    for index in range(count):
        device, token = await services.registry.create_device(created.id, f"dev-{index}")
        devices.append(Dev(str(device.id), token))
    return devices


def payload(seq: int) -> bytes:
    """A message of 3 points with an explicit ts (so exactly-once can be checked)."""
    return json.dumps(
        {
            "ts": BASE_TS + seq,
            "values": {"temperature": seq * 0.5, "pressure": seq, "running": True},
        }
    ).encode()


def connect(
    port: int,
    username: str | None,
    password: str | None,
    client_id: str,
    host: str = "127.0.0.1",
    timeout_s: float = 10.0,
) -> paho.Client:
    """A connected MQTT 3.1.1 paho client with its network loop running; raises if refused."""
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv311,
        clean_session=True,
    )
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    if username is not None:
        client.username_pw_set(username, password)
    result: dict[str, Any] = {}
    done = threading.Event()

    def on_connect(c: paho.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        result["reason"] = reason
        done.set()

    client.on_connect = on_connect
    client.connect(host, port, keepalive=30)
    client.loop_start()
    if not done.wait(timeout_s):
        client.loop_stop()
        raise TimeoutError("no CONNACK")
    if result["reason"].is_failure:
        client.loop_stop()
        raise PermissionError(str(result["reason"]))
    return client


async def close_client(client: paho.Client) -> None:
    """Disconnect and stop paho's network thread off the event loop: the platform under test
    may run on this loop, and paho's thread may be waiting on it to answer before it ends."""
    client.disconnect()
    await asyncio.to_thread(client.loop_stop)


def publish_all(
    port: int, devices: Sequence[Dev], per_device: int, qos: int = 1, timeout_s: float = 120.0
) -> None:
    """Each device publishes `per_device` messages (seq 0..n-1) and waits for every PUBACK."""

    def run(dev: Dev) -> None:
        client = connect(port, dev.id, dev.token, f"pub-{dev.id[:8]}")
        try:
            infos = [
                client.publish(f"devices/{dev.id}/telemetry", payload(seq), qos=qos)
                for seq in range(per_device)
            ]
            deadline = time.monotonic() + timeout_s
            for info in infos:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
                assert info.is_published(), "a message was never acknowledged"
        finally:
            client.disconnect()
            client.loop_stop()

    errors: list[BaseException] = []

    def guarded(dev: Dev) -> None:
        try:
            run(dev)
        except BaseException as exc:  # collected and re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(dev,)) for dev in devices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s + 30)
    if errors:
        raise errors[0]


async def telemetry_counts(pg_url: str) -> tuple[int, int]:
    """(rows, distinct (device, key, ts)) in the telemetry table."""
    conn = await asyncpg.connect(pg_url)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT (device_id, key, ts)) AS d FROM telemetry"
        )
    finally:
        await conn.close()
    return int(row["n"]), int(row["d"])


async def wait_for_rows(pg_url: str, expected: int, timeout_s: float = 60.0) -> int:
    """Poll until the telemetry table holds `expected` rows (or the time is up)."""
    deadline = time.monotonic() + timeout_s
    rows = 0
    while time.monotonic() < deadline:
        rows, _ = await telemetry_counts(pg_url)
        if rows >= expected:
            return rows
        await asyncio.sleep(0.2)
    return rows


@dataclass
class PrivateMosquitto:
    """A Mosquitto owned by one test (free port, persistence on), restartable."""

    port: int
    config: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (or restart) the broker and wait for its port."""
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=(self.config.parent / "mosquitto.log").open("ab"),
        )
        wait_for_port("127.0.0.1", self.port, timeout_s=10)

    def stop(self) -> None:
        """Stop the broker (SIGTERM: it saves its persistence file)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def private_mosquitto(tmp_path: Path, extra: str = "") -> Iterator[PrivateMosquitto]:
    """A private Mosquitto for tests that restart it or configure security."""
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed")
    port = free_port()
    data = tmp_path / "mosquitto"
    data.mkdir(exist_ok=True)
    config = data / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\n"
        # Run as ourselves (as root Mosquitto would switch to a user that cannot read tmp_path).
        f"user {getpass.getuser()}\n"
        "persistence true\n"
        f"persistence_location {data}/\n"
        "autosave_interval 1\n"
        "max_queued_messages 0\n"
        "max_inflight_messages 0\n" + (extra or "allow_anonymous true\n")
    )
    broker = PrivateMosquitto(port, config)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


async def wait_for_health(platform: Platform, name: str, state: str, timeout_s: float = 20) -> None:
    """Wait until a component reports `state` on the readiness board."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = platform.services.health.components.get(name)
        if health is not None and health.state == state:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{name} not {state}: {platform.services.health.components.get(name)}")


def drop_session(host: str, port: int, client_id: str) -> None:
    """Remove a persistent session from a broker (so shared brokers are left clean)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
    )
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 0
    with contextlib.suppress(OSError):
        client.connect(host, port, clean_start=True, properties=properties)
        client.loop_start()
        time.sleep(0.2)
        client.disconnect()
        client.loop_stop()


def unacked_messages(host: str, port: int, client_id: str, wait_s: float = 1.5) -> int:
    """Messages the broker still holds for a stopped platform's session (never acked).

    Resumes the session under the platform's client id and counts what the broker sends.
    """
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    received: list[int] = []
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
    )
    client.on_message = lambda c, u, m: received.append(m.mid)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 60
    client.connect(host, port, clean_start=False, properties=properties)
    client.loop_start()
    time.sleep(wait_s)
    client.disconnect()
    client.loop_stop()
    return len(received)


def mosquitto_pub_lines(
    port: int,
    dev: Dev,
    count: int,
    username: str | None = None,
    password: str | None = None,
    version: str = "mqttv311",
    topic: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Publish `count` messages (one per line) at QoS 1 with the `mosquitto_pub` command."""
    if shutil.which("mosquitto_pub") is None:
        pytest.skip("mosquitto_pub is not installed")
    lines = b"\n".join(payload(seq) for seq in range(count)) + b"\n"
    command = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-M", "1000"]
    command += ["-V", version, "-i", f"shell-{dev.id[:8]}", "-l"]
    command += ["-t", topic or f"devices/{dev.id}/telemetry"]
    if username is not None:
        command += ["-u", username]
        if password:
            command += ["-P", password]
    return subprocess.run(command, input=lines, capture_output=True, timeout=120, check=False)
