"""Commands across platform processes on PostgreSQL: a SIGKILL and restart while a
persistent command is QUEUED or SENT (ThingsBoard #11642), and a command made in one
process reaching a device that polls another."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import paho.mqtt.client as paho

from tests.e2e.test_coap_device_api import run_coap_client
from tests.e2e.test_commands_coap import coap_observer
from tests.integration.test_mqtt_support import connect, private_mosquitto
from tests.support import ADMIN_PASSWORD, free_port, platform_env, platform_process


@contextlib.asynccontextmanager
async def _client(port: int) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        login = await client.post(
            "/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        assert login.status_code == 200, login.text
        yield client, {"Authorization": f"Bearer {login.json()['access_token']}"}


async def _setup(client: httpx.AsyncClient, admin: dict[str, str]) -> dict[str, Any]:
    tenant = (await client.post("/api/tenants", json={"name": "plant"}, headers=admin)).json()
    answer = await client.post(
        "/api/devices", json={"name": "pump", "tenant_id": tenant["id"]}, headers=admin
    )
    assert answer.status_code == 201, answer.text
    device: dict[str, Any] = answer.json()
    return device


async def _persistent(
    client: httpx.AsyncClient, admin: dict[str, str], device: dict[str, Any], method: str
) -> dict[str, Any]:
    answer = await client.post(
        f"/api/devices/{device['id']}/commands",
        json={"method": method, "persistent": True},
        headers=admin,
    )
    assert answer.status_code == 202, answer.text
    command: dict[str, Any] = answer.json()
    return command


async def _take_and_answer(client: httpx.AsyncClient, token: str, answer: Any) -> dict[str, Any]:
    poll = await client.get(f"/api/v1/{token}/rpc", params={"timeout": 15_000})
    assert poll.status_code == 200, poll.text
    command: dict[str, Any] = poll.json()
    reply = await client.post(f"/api/v1/{token}/rpc/{command['id']}", json=answer)
    assert reply.status_code == 200, reply.text
    return command


async def _status(client: httpx.AsyncClient, admin: dict[str, str], command_id: str) -> Any:
    for _ in range(200):
        command = (await client.get(f"/api/commands/{command_id}", headers=admin)).json()
        if command["status"] == "SUCCESSFUL":
            return command
        await asyncio.sleep(0.05)
    return command


async def test_persistent_commands_survive_sigkill_while_queued_and_sent(
    tmp_path: Path, pg_url: str
) -> None:
    port = free_port()
    env = platform_env(tmp_path, IIOT_HTTP_PORT=str(port), IIOT_DATABASE_URL=pg_url)
    with platform_process(env) as proc:
        async with _client(port) as (client, admin):
            device = await _setup(client, admin)
            queued = await _persistent(client, admin, device, "whileQueued")
            sent = await _persistent(client, admin, device, "whileSent")
        # The platform dies just after handing the second command to a link: it is SENT
        # and no device confirmed it.
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(
                "UPDATE commands SET status = 'SENT', deadline = 0 WHERE id = $1", sent["id"]
            )
        finally:
            await conn.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with platform_process(env):
        async with _client(port) as (client, admin):
            first = await _take_and_answer(client, device["token"], "one")
            second = await _take_and_answer(client, device["token"], "two")
            assert [first["id"], second["id"]] == [queued["id"], sent["id"]]
            done = await _status(client, admin, sent["id"])
            assert done["status"] == "SUCCESSFUL" and done["response"] == "two"
            path = [t["status"] for t in done["transitions"]]
            assert path[-4:] == ["QUEUED", "SENT", "DELIVERED", "SUCCESSFUL"]
            assert (await _status(client, admin, queued["id"]))["status"] == "SUCCESSFUL"


async def test_command_made_in_one_process_reaches_a_device_on_another(
    tmp_path: Path, pg_url: str
) -> None:
    sender_port, holder_port = free_port(), free_port()
    sender_env = platform_env(
        tmp_path / "a", IIOT_HTTP_PORT=str(sender_port), IIOT_DATABASE_URL=pg_url
    )
    holder_env = platform_env(
        tmp_path / "b", IIOT_HTTP_PORT=str(holder_port), IIOT_DATABASE_URL=pg_url
    )
    with (
        platform_process(sender_env, "--role", "api"),
        platform_process(holder_env, "--role", "api"),
    ):
        async with _client(sender_port) as (sender, admin), _client(holder_port) as (holder, _):
            device = await _setup(sender, admin)
            token = device["token"]
            # Lightweight two-way: the REST call waits in the sender while the device
            # answers through the other process.
            device_side = asyncio.create_task(_take_and_answer(holder, token, {"rpm": 900}))
            await asyncio.sleep(0.5)
            answer = await sender.post(
                f"/api/devices/{device['id']}/commands",
                json={"method": "getRpm"},
                headers=admin,
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["response"] == {"rpm": 900}
            await device_side
            # Persistent, made while the device is away, delivered when it polls the other.
            queued = await _persistent(sender, admin, device, "later")
            taken = await _take_and_answer(holder, token, "ok")
            assert taken["id"] == queued["id"]
            assert (await _status(sender, admin, queued["id"]))["status"] == "SUCCESSFUL"


async def test_sigkill_while_sent_through_the_external_broker(tmp_path: Path, pg_url: str) -> None:
    """A command really left SENT (the broker took it, the device never answered) is sent
    again after a SIGKILL and restart, with the same id, and the answer completes it."""

    port = free_port()
    with private_mosquitto(tmp_path) as broker:
        env = platform_env(
            tmp_path / "platform",
            IIOT_HTTP_PORT=str(port),
            IIOT_DATABASE_URL=pg_url,
            IIOT_MQTT_URL=f"mqtt://127.0.0.1:{broker.port}",
        )
        seen: list[str] = []
        answering = threading.Event()
        got_one = threading.Event()
        with platform_process(env) as proc:
            async with _client(port) as (client, admin):
                device = await _setup(client, admin)
                did = device["id"]
                mqtt = connect(broker.port, None, None, f"device-{did}")

                def on_message(c: paho.Client, u: Any, message: paho.MQTTMessage) -> None:
                    command_id = message.topic.rsplit("/", 1)[1]
                    seen.append(command_id)
                    got_one.set()
                    if answering.is_set():
                        c.publish(message.topic + "/reply", json.dumps({"ok": True}), qos=1)

                mqtt.on_message = on_message
                mqtt.subscribe(f"devices/{did}/commands/+", qos=1)
                try:
                    command = await _persistent(client, admin, device, "stuck")
                    assert await asyncio.to_thread(got_one.wait, 15)
                    state = (
                        await client.get(f"/api/commands/{command['id']}", headers=admin)
                    ).json()
                    assert state["status"] == "SENT"  # the broker's PUBACK proves nothing more
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    answering.set()
                    with platform_process(env):
                        async with _client(port) as (client2, admin2):
                            done = await _status(client2, admin2, command["id"])
                            assert done["status"] == "SUCCESSFUL" and done["response"] == {
                                "ok": True
                            }
                            assert set(seen) == {command["id"]} and len(seen) >= 2
                finally:
                    mqtt.loop_stop()
                    mqtt.disconnect()


async def test_command_from_the_api_process_reaches_a_device_on_the_ingest_process(
    tmp_path: Path, pg_url: str
) -> None:
    """`--role api` beside `--role ingest`: the device observes over CoAP on the ingest one."""

    api_port, ops_port = free_port(), free_port()
    coap_port = free_port(socket.SOCK_DGRAM)
    api_env = platform_env(tmp_path / "api", IIOT_HTTP_PORT=str(api_port), IIOT_DATABASE_URL=pg_url)
    ingest_env = platform_env(
        tmp_path / "ingest",
        IIOT_HTTP_PORT=str(ops_port),
        IIOT_DATABASE_URL=pg_url,
        IIOT_COAP_PORT=str(coap_port),
    )
    with (
        platform_process(api_env, "--role", "api"),
        platform_process(ingest_env, "--role", "ingest"),
    ):
        async with _client(api_port) as (client, admin):
            device = await _setup(client, admin)
            base = f"coap://127.0.0.1:{coap_port}/api/v1/{device['token']}"
            queued = await _persistent(client, admin, device, "whileAway")
            async with coap_observer(f"{base}/rpc") as notifications:
                first = await asyncio.wait_for(notifications.get(), 20)
                assert first["id"] == queued["id"]
                await run_coap_client("-m", "post", "-e", '"ok"', f"{base}/rpc/{first['id']}")
                assert (await _status(client, admin, queued["id"]))["status"] == "SUCCESSFUL"

                async def device_answers() -> None:
                    command = await asyncio.wait_for(notifications.get(), 20)
                    await run_coap_client("-m", "post", "-e", "42", f"{base}/rpc/{command['id']}")

                answering = asyncio.create_task(device_answers())
                answer = await client.post(
                    f"/api/devices/{device['id']}/commands", json={"method": "read"}, headers=admin
                )
                await answering
                assert answer.status_code == 200, answer.text
                assert answer.json()["response"] == 42
                path = [t["status"] for t in answer.json()["transitions"]]
                assert path == ["QUEUED", "SENT", "DELIVERED", "SUCCESSFUL"]
