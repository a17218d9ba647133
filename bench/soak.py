"""A bounded soak: every protocol at once, with random faults, then an exactly-once check.

    python -m bench.soak --duration 600        (`make soak`; SOAK_S=120 make soak for 2 min)

What runs (all on 127.0.0.1, nothing shared is restarted):
- the platform as a child process (`python -m iiot run`) on a private PostgreSQL cluster,
  subscribed to a private Mosquitto and consuming RabbitMQ (the vhost of
  `IIOT_TEST_AMQP_URL`) through a TCP proxy;
- one device per protocol sending numbered messages with explicit `ts`: HTTP, CoAP through
  a UDP proxy that drops 10 % of the datagrams each way, AMQP with publisher confirms,
  MQTT QoS 1 through the private Mosquitto;
- random faults, one at a time: platform SIGKILL and restart, PostgreSQL restart
  (immediate stop), Mosquitto restart, RabbitMQ connection outage (the proxy cuts every
  connection and refuses new ones for a few seconds; the shared broker itself is never
  restarted).

A message counts as acknowledged when its sender got the protocol's acknowledgement
(HTTP 200, CoAP 2.04, AMQP publisher confirm, MQTT PUBACK from the broker). At the end
the senders stop, the platform drains the brokers, and every acknowledged point must be
stored exactly once (no acknowledged point missing, no point stored twice). Prints the
figures and exits non-zero on a lost or duplicated point.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiocoap
import asyncpg
import httpx
import paho.mqtt.client as paho
from aiocoap.numbers.codes import Code
from paho.mqtt.enums import CallbackAPIVersion

from tests.amqp_support import TestDevice, make_devices, reset_broker
from tests.integration.test_mqtt_support import PrivateMosquitto
from tests.pgcluster import private_cluster
from tests.support import free_port, platform_env, wait_for_port
from tests.tcp_proxy import TcpProxy
from tests.udp_proxy import LossyUdpProxy

TS = 1_767_225_600_000
PROTOCOLS = ("http", "coap", "amqp", "mqtt")
FAULTS = ("platform_sigkill", "postgres_restart", "mosquitto_restart", "amqp_outage")


@dataclass
class Sender:
    """One protocol's device and what it got acknowledged."""

    protocol: str
    device: TestDevice
    sent: int = 0
    acked: set[int] = field(default_factory=set)
    errors: int = 0


@dataclass
class Faults:
    """Faults injected so far."""

    counts: dict[str, int] = field(default_factory=dict)

    def note(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        print(f"  fault: {kind}", flush=True)


def body(seq: int) -> bytes:
    """A message with an explicit ts: each point is identified by (device, key, ts)."""
    return json.dumps({"ts": TS + seq, "values": {"seq": seq, "even": seq % 2 == 0}}).encode()


class PlatformProcess:
    """`python -m iiot run` as a child process, killed and started again on demand."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = {**os.environ, **env}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "iiot", "run"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for_port("127.0.0.1", int(self.env["IIOT_HTTP_PORT"]), timeout_s=60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- senders -------------------------------------------------------------------------------
async def send_http(s: Sender, port: int, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        seq = 0
        while not stop.is_set():
            try:
                answer = await client.post(f"/api/v1/{s.device.token}/telemetry", content=body(seq))
            except httpx.HTTPError:
                answer = None
            s.sent += 1
            if answer is not None and answer.status_code == 200:
                s.acked.add(seq)
                seq += 1
            else:
                s.errors += 1
                await asyncio.sleep(0.2)  # a device retries the same message
            await asyncio.sleep(0.01)


async def send_coap(s: Sender, port: int, stop: asyncio.Event) -> None:
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        seq = 0
        while not stop.is_set():
            message = aiocoap.Message(
                code=Code.POST,
                uri=f"coap://127.0.0.1:{port}/api/v1/{s.device.token}/telemetry",
                payload=body(seq),
            )
            s.sent += 1
            try:
                answer = await asyncio.wait_for(client.request(message).response, 60)
                ok = answer.code == Code.CHANGED
            except (TimeoutError, aiocoap.error.Error):
                ok = False
            if ok:
                s.acked.add(seq)
                seq += 1
            else:
                s.errors += 1
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.01)
    finally:
        await client.shutdown()


async def send_amqp(s: Sender, url: str, stop: asyncio.Event) -> None:
    seq = 0
    while not stop.is_set():
        try:
            connection = await aio_pika.connect(url, timeout=10)
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                exchange = await channel.declare_exchange(
                    "iiot", aio_pika.ExchangeType.TOPIC, durable=True
                )
                queue = await channel.declare_queue("telemetry", durable=True)
                await queue.bind(exchange, "telemetry.*")
                while not stop.is_set():
                    message = aio_pika.Message(
                        body(seq),
                        headers={"token": s.device.token},
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    )
                    s.sent += 1
                    await exchange.publish(message, f"telemetry.{s.device.id}", timeout=10)
                    s.acked.add(seq)
                    seq += 1
                    await asyncio.sleep(0.01)
        except Exception:  # broker gone: a gateway reconnects and publishes again
            s.errors += 1
            await asyncio.sleep(0.5)


def _published(info: paho.MQTTMessageInfo) -> bool:
    """Whether the broker acknowledged the message within 5 s (paho raises while offline)."""
    try:
        info.wait_for_publish(5)
        return info.is_published()
    except (RuntimeError, ValueError):
        time.sleep(0.5)
        return False


def send_mqtt(s: Sender, port: int, stop: asyncio.Event) -> None:
    """Blocking (paho's own thread): QoS 1, waits for each PUBACK, retries on failure."""
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"soak-{s.device.id}",
        protocol=paho.MQTTv311,
        clean_session=False,
    )
    client.username_pw_set(str(s.device.id), s.device.token)
    client.connect_async("127.0.0.1", port, keepalive=10)
    client.loop_start()
    try:
        seq = 0
        while not stop.is_set():
            s.sent += 1
            info = client.publish(f"devices/{s.device.id}/telemetry", body(seq), qos=1)
            if _published(info):
                s.acked.add(seq)
                seq += 1
            else:
                s.errors += 1
                time.sleep(0.2)
            time.sleep(0.01)
    finally:
        client.disconnect()
        client.loop_stop()


# --- faults --------------------------------------------------------------------------------
async def inject_faults(
    stop: asyncio.Event,
    platform: PlatformProcess,
    cluster: Any,
    mosquitto: PrivateMosquitto,
    amqp_proxy: TcpProxy,
    faults: Faults,
    rng: random.Random,
) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(8, 20))
        if stop.is_set():
            return
        kind = rng.choice(
            ["platform_sigkill", "postgres_restart", "mosquitto_restart", "amqp_outage"]
        )
        faults.note(kind)
        if kind == "platform_sigkill":
            await asyncio.to_thread(platform.kill)
            await asyncio.sleep(rng.uniform(0.5, 3))
            await asyncio.to_thread(platform.start)
        elif kind == "postgres_restart":
            await asyncio.to_thread(cluster.stop, "immediate")
            await asyncio.sleep(rng.uniform(1, 5))
            await asyncio.to_thread(cluster.start)
        elif kind == "mosquitto_restart":
            await asyncio.to_thread(mosquitto.stop)
            await asyncio.sleep(rng.uniform(0.5, 3))
            await asyncio.to_thread(mosquitto.start)
        else:
            await amqp_proxy.outage(rng.uniform(1, 5))


# --- the check -----------------------------------------------------------------------------
async def stored(db_url: str, device: TestDevice) -> tuple[list[int], int]:
    """(seqs stored for the device's key `seq`, rows of that key)."""
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch(
            "SELECT ts FROM telemetry WHERE device_id = $1 AND key = 'seq'", device.id
        )
    finally:
        await conn.close()
    return sorted(int(r["ts"]) - TS for r in rows), len(rows)


async def soak(duration_s: float, seed: int) -> int:
    amqp_base = os.environ.get("IIOT_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="iiot-soak-") as tmp, private_cluster() as cluster:
        root = Path(tmp)
        os.chmod(root, 0o755)
        db_url = cluster.url()
        devices = await make_devices(db_url, len(PROTOCOLS), tenant="soak")
        senders = {p: Sender(p, d) for p, d in zip(PROTOCOLS, devices, strict=True)}
        (root / "mosquitto").mkdir()
        mqtt_port = free_port()
        config = root / "mosquitto" / "mosquitto.conf"
        config.write_text(
            f"listener {mqtt_port} 127.0.0.1\n"
            f"persistence true\npersistence_location {root / 'mosquitto'}/\n"
            "autosave_interval 1\nmax_queued_messages 0\nmax_inflight_messages 0\n"
            f"allow_anonymous true\nuser {getpass.getuser()}\n"
        )
        mosquitto = PrivateMosquitto(mqtt_port, config)
        mosquitto.start()
        await reset_broker(amqp_base)
        parts = urlsplit(amqp_base)
        http_port, coap_port = free_port(), free_port(socket.SOCK_DGRAM)
        faults = Faults()
        async with (
            TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as amqp_proxy,
            LossyUdpProxy(("127.0.0.1", coap_port), loss=0.1, seed=seed) as udp,
        ):
            proxied = urlunsplit(
                parts._replace(
                    netloc=f"{parts.username}:{parts.password}@127.0.0.1:{amqp_proxy.port}"
                )
            )
            env = platform_env(
                root / "data",
                IIOT_DATABASE_URL=db_url,
                IIOT_HTTP_PORT=str(http_port),
                IIOT_COAP_PORT=str(coap_port),
                IIOT_AMQP_URL=proxied,
                IIOT_MQTT_URL=f"mqtt://127.0.0.1:{mqtt_port}?client_id=iiot-soak",
                IIOT_COMMIT_TIMEOUT_S="10",
            )
            platform = PlatformProcess(env, root / "platform.log")
            platform.start()
            stop = asyncio.Event()
            started = time.monotonic()
            print(f"soak for {duration_s:.0f} s (seed {seed})", flush=True)
            tasks = [
                asyncio.create_task(send_http(senders["http"], http_port, stop)),
                asyncio.create_task(send_coap(senders["coap"], udp.port, stop)),
                asyncio.create_task(send_amqp(senders["amqp"], amqp_base, stop)),
                asyncio.create_task(asyncio.to_thread(send_mqtt, senders["mqtt"], mqtt_port, stop)),
                asyncio.create_task(
                    inject_faults(stop, platform, cluster, mosquitto, amqp_proxy, faults, rng)
                ),
            ]
            try:
                await asyncio.sleep(duration_s)
            finally:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
            # Drain: the platform consumes what the brokers still hold for it.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                done = True
                for s in senders.values():
                    seqs, _ = await stored(db_url, s.device)
                    if not s.acked <= set(seqs):
                        done = False
                if done:
                    break
                await asyncio.sleep(1)
            platform.stop()
            mosquitto.stop()
        elapsed = time.monotonic() - started
        failed = False
        print(f"\nran {elapsed:.0f} s; faults: {faults.counts}; CoAP datagrams: {udp.stats}")
        print("protocol | sent | acknowledged | stored | acknowledged missing | duplicates")
        for s in senders.values():
            seqs, rows = await stored(db_url, s.device)
            missing = len(s.acked - set(seqs))
            duplicates = rows - len(set(seqs))
            failed = failed or missing > 0 or duplicates > 0
            print(
                f"{s.protocol} | {s.sent} | {len(s.acked)} | {len(set(seqs))} | "
                f"{missing} | {duplicates}"
            )
        print("FAILED: acknowledged points lost or duplicated" if failed else "OK: exactly once")
        if failed:
            kept = Path.cwd() / "soak-platform.log"
            shutil.copyfile(root / "platform.log", kept)
            print(f"the platform's log: {kept}")
        return 1 if failed else 0


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    sys.exit(asyncio.run(soak(args.duration, args.seed)))


if __name__ == "__main__":
    main()
