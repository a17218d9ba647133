"""Three platform nodes on one PostgreSQL, one RabbitMQ and one Mosquitto, under load on
every ingest protocol; one node is killed with SIGKILL and comes back.

Each node is a separate `iiot run` process with its own data directory and ports, as
separate machines would be behind a load balancer (docs/scaling.md). MQTT devices publish
to the shared Mosquitto, read by the nodes through a shared subscription (one persistent
session per node); AMQP devices publish to RabbitMQ, whose `telemetry` queue the nodes
consume as competing consumers; CoAP and HTTP devices talk to the nodes in turn, as a
load balancer would spread them. Every point a broker or a node acknowledged must be
stored exactly once: messages the killed node held unacknowledged are redelivered (AMQP
to the other nodes, MQTT to the node's own session when it returns).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

import aiocoap
import httpx
import paho.mqtt.client as paho
import pytest
from aiocoap.numbers.codes import Code
from paho.mqtt.enums import CallbackAPIVersion

from tests.amqp_support import (
    BASE_TS,
    TestDevice,
    count_points,
    make_devices,
    message_body,
    publish_telemetry,
    reset_broker,
    stored_points,
    wait_consumers,
    wait_for,
)
from tests.integration.test_mqtt_support import private_mosquitto
from tests.support import free_port, platform_env

# The shared RabbitMQ/Mosquitto: never run these tests in parallel with each other.
pytestmark = pytest.mark.shared_brokers

KEYS = ("temperature", "count", "ok")
MQTT_MESSAGES, AMQP_MESSAGES = 6_000, 6_000
DIRECT_MESSAGES = 600  # CoAP and HTTP each, spread over the nodes
# Disjoint sequence ranges (timestamps) per protocol.
MQTT_START, AMQP_START, COAP_START, HTTP_START = 0, 100_000, 200_000, 300_000

Point = tuple[UUID, str, int]


def points_of(devices: Sequence[TestDevice], seqs: Sequence[int]) -> set[Point]:
    return {(devices[seq % len(devices)].id, key, BASE_TS + seq) for seq in seqs for key in KEYS}


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
                answer = await client.get(f"http://127.0.0.1:{self.http_port}/readyz")
            except httpx.HTTPError:
                return False
            return answer.status_code == 200

        await wait_for(check, 60, f"node {self.http_port} ready")
        answer = await client.get(f"http://127.0.0.1:{self.http_port}/readyz")
        return dict(answer.json())


def mqtt_publish(port: int, devices: Sequence[TestDevice], start: int, count: int) -> list[int]:
    """QoS 1 publishes; the sequence numbers the broker acknowledged (PUBACK)."""
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    sent = []
    for seq in range(start, start + count):
        device = devices[seq % len(devices)]
        sent.append((seq, client.publish(f"devices/{device.id}/telemetry", message_body(seq), 1)))
    acked = []
    for seq, info in sent:
        info.wait_for_publish(60)
        if info.is_published():
            acked.append(seq)
    client.disconnect()
    client.loop_stop()
    return acked


async def coap_load(
    nodes: Sequence[Node], devices: Sequence[TestDevice], start: int, count: int
) -> list[int]:
    """Confirmable POSTs spread over the nodes; the sequence numbers answered 2.04."""
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    acked: list[int] = []

    async def one(seq: int) -> None:
        node = nodes[seq % len(nodes)]
        device = devices[seq % len(devices)]
        uri = f"coap://127.0.0.1:{node.coap_port}/api/v1/{device.token}/telemetry"
        request = aiocoap.Message(code=Code.POST, uri=uri, payload=message_body(seq))
        try:
            response = await asyncio.wait_for(context.request(request).response, 5)
        except (TimeoutError, aiocoap.error.Error, OSError):
            return  # not acknowledged: the device would send it again
        if response.code == Code.CHANGED:
            acked.append(seq)

    try:
        for first in range(start, start + count, 20):
            await asyncio.gather(*(one(s) for s in range(first, min(first + 20, start + count))))
            await asyncio.sleep(0.02)
    finally:
        await context.shutdown()
    return acked


async def _http_load(
    nodes: Sequence[Node], devices: Sequence[TestDevice], start: int, count: int
) -> list[int]:
    """Device HTTP API POSTs spread over the nodes; the sequence numbers answered 2xx."""
    acked: list[int] = []
    async with httpx.AsyncClient(timeout=5) as client:

        async def one(seq: int) -> None:
            node = nodes[seq % len(nodes)]
            device = devices[seq % len(devices)]
            url = f"http://127.0.0.1:{node.http_port}/api/v1/{device.token}/telemetry"
            try:
                answer = await client.post(url, json=json.loads(message_body(seq)))
            except httpx.HTTPError:
                return
            if answer.is_success:
                acked.append(seq)

        for first in range(start, start + count, 20):
            await asyncio.gather(*(one(s) for s in range(first, min(first + 20, start + count))))
            await asyncio.sleep(0.02)
    return acked


async def test_three_nodes_one_killed_store_every_acknowledged_point_once(
    tmp_path: Path, pg_url: str, amqp_url: str
) -> None:
    await reset_broker(amqp_url)
    devices = await make_devices(pg_url, 40)
    mqtt_devices, amqp_devices = devices[:10], devices[10:20]
    coap_devices, http_devices = devices[20:30], devices[30:40]
    with private_mosquitto(tmp_path) as broker:
        nodes = []
        for index in range(3):
            data = tmp_path / f"node{index}"
            data.mkdir()
            env = platform_env(
                data,
                IIOT_DATABASE_URL=pg_url,
                IIOT_HTTP_PORT=str(free_port()),
                IIOT_COAP_PORT=str(free_port(socket.SOCK_DGRAM)),
                IIOT_MQTT_URL=f"mqtt://127.0.0.1:{broker.port}",
                IIOT_MQTT_SHARED_GROUP="iiot",
                IIOT_AMQP_URL=amqp_url,
                IIOT_LOG_LEVEL="INFO",
            )
            nodes.append(Node(env, data / "node.log"))
        try:
            for node in nodes:
                node.start()
            async with httpx.AsyncClient(timeout=5) as client:
                for node in nodes:
                    ready = await node.ready(client)
                    for name in ("mqtt", "amqp", "coap"):
                        assert ready["components"][name]["state"] == "up"  # type: ignore[index]
                await wait_consumers(amqp_url, 3, 30)

                mqtt = asyncio.create_task(
                    asyncio.to_thread(
                        mqtt_publish, broker.port, mqtt_devices, MQTT_START, MQTT_MESSAGES
                    )
                )
                amqp = asyncio.create_task(
                    publish_telemetry(
                        amqp_url, amqp_devices, AMQP_MESSAGES, start=AMQP_START, window=200
                    )
                )
                coap = asyncio.create_task(
                    coap_load(nodes, coap_devices, COAP_START, DIRECT_MESSAGES)
                )
                http = asyncio.create_task(
                    _http_load(nodes, http_devices, HTTP_START, DIRECT_MESSAGES)
                )

                # Kill a node mid-load, while it holds unacknowledged messages.
                await wait_for(
                    lambda: _at_least(pg_url, 3_000), 60, "some points stored before the kill"
                )
                victim = nodes[1]
                victim.kill()
                assert victim.proc is not None and victim.proc.returncode == -signal.SIGKILL
                await wait_consumers(amqp_url, 2, 30)
                killed_at = await count_points(pg_url)
                await asyncio.sleep(1)  # load goes on with the node down
                victim.start()
                ready = await victim.ready(client)
                assert ready["status"] == "ready"
                await wait_consumers(amqp_url, 3, 30)

                mqtt_acked = await asyncio.wait_for(mqtt, 120)
                await asyncio.wait_for(amqp, 120)
                coap_acked = await asyncio.wait_for(coap, 120)
                http_acked = await asyncio.wait_for(http, 120)

                assert len(mqtt_acked) == MQTT_MESSAGES  # Mosquitto stayed up: all PUBACKed
                expected_brokers = points_of(
                    mqtt_devices, range(MQTT_START, MQTT_START + MQTT_MESSAGES)
                ) | points_of(amqp_devices, range(AMQP_START, AMQP_START + AMQP_MESSAGES))
                acked_direct = points_of(coap_devices, coap_acked) | points_of(
                    http_devices, http_acked
                )
                must_have = expected_brokers | acked_direct
                assert killed_at < len(must_have), "the kill came too late to test anything"

                async def all_stored() -> bool:
                    return must_have <= set(await stored_points(pg_url))

                await wait_for(all_stored, 90, "every acknowledged point stored", 0.5)
                for node in nodes:
                    await node.ready(client)
        finally:
            codes = [node.stop() for node in nodes]
    assert codes == [0, 0, 0], "a node did not stop cleanly on SIGTERM"

    rows = await stored_points(pg_url)
    assert len(rows) == len(set(rows)), "a point was stored twice"
    stored = set(rows)
    # Broker-delivered points: exactly the ones published, no more, no fewer.
    broker_rows = {r for r in stored if r[0] in {d.id for d in mqtt_devices + amqp_devices}}
    assert broker_rows == expected_brokers
    # Direct points: every acknowledged one; unacknowledged ones (sent to the killed node)
    # may or may not have been committed before it died, but nothing else appears.
    sent_direct = points_of(
        coap_devices, range(COAP_START, COAP_START + DIRECT_MESSAGES)
    ) | points_of(http_devices, range(HTTP_START, HTTP_START + DIRECT_MESSAGES))
    assert acked_direct <= stored
    assert stored - broker_rows <= sent_direct
    assert len(coap_acked) > DIRECT_MESSAGES // 2 and len(http_acked) > DIRECT_MESSAGES // 2


async def _at_least(db_url: str, points: int) -> bool:
    return await count_points(db_url) >= points
