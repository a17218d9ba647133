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

The second test keeps the control side working while a node is dead: commands sent
through one surviving node reach a device connected to the other, and the console's live
channel on one node shows values posted through another.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

import aiocoap
import httpx
import paho.mqtt.client as paho
import pytest
from aiocoap.numbers.codes import Code
from paho.mqtt.enums import CallbackAPIVersion
from websockets.asyncio.client import ClientConnection

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
from tests.e2e.node_helpers import Node, make_nodes, start_nodes
from tests.e2e.test_live_channel import answer, live, subscribe
from tests.integration.test_mqtt_support import private_mosquitto
from tests.support import ADMIN_PASSWORD

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
        nodes = make_nodes(tmp_path, pg_url, amqp_url, broker.port)
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                await start_nodes(nodes, client)
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


async def test_three_nodes_one_killed_commands_and_live_values_cross_nodes(
    tmp_path: Path, pg_url: str, amqp_url: str
) -> None:
    await reset_broker(amqp_url)
    with private_mosquitto(tmp_path) as broker:
        nodes = make_nodes(tmp_path, pg_url, amqp_url, broker.port)
        first, victim, last = nodes
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                await start_nodes(nodes, client)
                # One login, on the first node; the same signing key makes it valid on all.
                login = await client.post(
                    f"{first.url}/api/auth/login",
                    json={"username": "admin", "password": ADMIN_PASSWORD},
                )
                assert login.status_code == 200, login.text
                admin = {"Authorization": f"Bearer {login.json()['access_token']}"}
                device = await _device(client, first, admin)
                token = device["token"]

                async with live(first.url, admin) as ws_first, live(last.url, admin) as ws_last:
                    for ws in (ws_first, ws_last):
                        subscribed = await subscribe(ws, ["telemetry"], device["id"])
                        assert subscribed["type"] == "subscribed", subscribed
                    await _post(client, victim, token, {"level": 1})
                    await _sees(ws_first, "level", 1)
                    await _sees(ws_last, "level", 1)

                    # The device waits for commands on the victim when it dies.
                    polling = asyncio.create_task(
                        client.get(f"{victim.url}/api/v1/{token}/rpc", params={"timeout": 20_000})
                    )
                    await asyncio.sleep(0.5)
                    victim.kill()
                    with pytest.raises(httpx.HTTPError):
                        await polling

                    # Live values still cross between the two survivors, both ways.
                    await _post(client, first, token, {"level": 2})
                    await _sees(ws_last, "level", 2)
                    await _post(client, last, token, {"level": 3})
                    await _sees(ws_first, "level", 3)

                    # A two-way command sent through the first node reaches the device,
                    # which now polls the last one; the answer comes back to the REST call.
                    device_side = asyncio.create_task(
                        _take_and_answer(client, last, token, {"level": 3})
                    )
                    await asyncio.sleep(1)  # its poll is open on the last node
                    sent = await client.post(
                        f"{first.url}/api/devices/{device['id']}/commands",
                        json={"method": "getLevel", "params": {"unit": "m"}, "timeout_ms": 10_000},
                        headers=admin,
                    )
                    assert sent.status_code == 200, sent.text
                    done = sent.json()
                    assert (done["status"], done["response"]) == ("SUCCESSFUL", {"level": 3})
                    taken = await device_side
                    assert (taken["id"], taken["params"]) == (done["id"], {"unit": "m"})

                    # A persistent command queued through the last node while the device is
                    # offline: delivered when it polls the first node.
                    queued = await client.post(
                        f"{last.url}/api/devices/{device['id']}/commands",
                        json={"method": "calibrate", "persistent": True, "timeout_ms": 2_000},
                        headers=admin,
                    )
                    assert queued.status_code == 202, queued.text
                    assert queued.json()["status"] == "QUEUED"
                    taken = await _take_and_answer(client, first, token, "calibrated")
                    assert taken["id"] == queued.json()["id"]
                    stored = await _final(client, last, admin, taken["id"])
                    assert (stored["status"], stored["response"]) == ("SUCCESSFUL", "calibrated")

                # The victim comes back and its live clients see the others' values again.
                victim.start()
                await victim.ready(client)
                async with live(victim.url, admin) as ws_victim:
                    await subscribe(ws_victim, ["telemetry"], device["id"])
                    await _post(client, first, token, {"level": 4})
                    await _sees(ws_victim, "level", 4)
        finally:
            codes = [node.stop() for node in nodes]
    assert codes == [0, 0, 0], "a node did not stop cleanly on SIGTERM"


async def _device(client: httpx.AsyncClient, node: Node, admin: dict[str, str]) -> Any:
    tenant = await client.post(f"{node.url}/api/tenants", json={"name": "plant"}, headers=admin)
    assert tenant.status_code == 201, tenant.text
    made = await client.post(
        f"{node.url}/api/devices",
        json={"name": "tank", "tenant_id": tenant.json()["id"]},
        headers=admin,
    )
    assert made.status_code == 201, made.text
    return made.json()


async def _post(client: httpx.AsyncClient, node: Node, token: str, values: Any) -> None:
    response = await client.post(f"{node.url}/api/v1/{token}/telemetry", json=values)
    assert response.status_code == 200, response.text


async def _sees(ws: ClientConnection, key: str, value: Any) -> None:
    """The live client receives this value of the key (15 s at most)."""
    async with asyncio.timeout(15):
        while True:
            message = await answer(ws, "telemetry")
            if message["data"].get(key, {}).get("value") == value:
                return


async def _take_and_answer(client: httpx.AsyncClient, node: Node, token: str, reply: Any) -> Any:
    """The device polls one node for a command and answers it there."""
    poll = await client.get(f"{node.url}/api/v1/{token}/rpc", params={"timeout": 15_000})
    assert poll.status_code == 200, poll.text
    command = poll.json()
    response = await client.post(f"{node.url}/api/v1/{token}/rpc/{command['id']}", json=reply)
    assert response.status_code == 200, response.text
    return command


async def _final(
    client: httpx.AsyncClient, node: Node, admin: dict[str, str], command_id: str
) -> Any:
    """The command as the node stores it, once SUCCESSFUL (10 s at most)."""
    async with asyncio.timeout(10):
        while True:
            command = (
                await client.get(f"{node.url}/api/commands/{command_id}", headers=admin)
            ).json()
            if command["status"] == "SUCCESSFUL":
                return command
            await asyncio.sleep(0.1)
