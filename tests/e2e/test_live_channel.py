"""The live channel `/api/ws`: JWT in the first message, tenant scope, coalescing, split roles.

Real WebSocket clients (the `websockets` library) against the running platform.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.e2e.api_helpers import Api, api_platform
from tests.support import ADMIN_PASSWORD, free_port, platform_env, platform_process

Message = dict[str, Any]


@contextlib.asynccontextmanager
async def live(base: str, headers: dict[str, str]) -> AsyncIterator[ClientConnection]:
    """A live connection, authenticated with the bearer token of `headers`."""
    token = headers["Authorization"].removeprefix("Bearer ")
    async with websockets.connect(base.replace("http", "ws", 1) + "/api/ws") as ws:
        await ws.send(json.dumps({"type": "auth", "token": token}))
        [ready] = json.loads(await ws.recv())
        assert ready["type"] == "ready", ready
        yield ws


# Messages received but not yet looked at, per connection (a frame holds several).
_unread: dict[int, list[Message]] = {}


async def messages(ws: ClientConnection) -> AsyncIterator[Message]:
    """The server's messages, one by one (each frame is an array of them)."""
    unread = _unread.setdefault(id(ws), [])
    while True:
        if not unread:
            unread.extend(json.loads(await ws.recv()))
        yield unread.pop(0)


async def answer(ws: ClientConnection, wanted: str) -> Message:
    """The next message of a type, skipping others (15 s at most)."""
    async with asyncio.timeout(15):
        async for message in messages(ws):
            if message["type"] == wanted:
                return message
    raise AssertionError("unreachable")


async def subscribe(ws: ClientConnection, topics: list[str], device_id: str | None) -> Message:
    """Subscribe and return the server's answer."""
    await ws.send(json.dumps({"type": "subscribe", "topics": topics, "device_id": device_id}))
    async with asyncio.timeout(15):
        async for message in messages(ws):
            if message["type"] in ("subscribed", "error"):
                return message
    raise AssertionError("unreachable")


def base_of(api: Api) -> str:
    return str(api.client.base_url).rstrip("/")


async def test_a_wrong_or_missing_token_closes_the_connection(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        url = base_of(api).replace("http", "ws", 1) + "/api/ws"
        for first in ({"type": "auth", "token": "not-a-jwt"}, {"type": "subscribe"}):
            async with websockets.connect(url) as ws:
                await ws.send(json.dumps(first))
                [error] = json.loads(await ws.recv())
                assert error["type"] == "error"
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


async def test_another_tenants_events_never_reach_a_client(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        acme = await api.tenant("acme")
        globex = await api.tenant("globex")
        _, acme_admin = await api.user("acme-admin", "tenant_admin", acme["id"])
        ours = await api.device(api.admin, "ours", tenant_id=acme["id"])
        theirs = await api.device(api.admin, "theirs", tenant_id=globex["id"])
        async with (
            live(base_of(api), acme_admin) as ws,
            live(base_of(api), api.admin) as sysadmin,
        ):
            refused = await subscribe(ws, ["telemetry"], theirs["id"])
            assert refused == {"type": "error", "detail": f"device {theirs['id']} not found"}
            ok = await subscribe(ws, ["telemetry", "device"], None)  # every device in scope
            assert ok["type"] == "subscribed"
            assert (await subscribe(sysadmin, ["telemetry"], None))["type"] == "subscribed"

            # The other tenant's point and change come first; ours come last.
            await api.ok("POST", f"/api/v1/{theirs['token']}/telemetry", json={"secret": 1})
            await api.ok(
                "PATCH", f"/api/devices/{theirs['id']}", json={"status": "x"}, headers=api.admin
            )
            await api.ok("POST", f"/api/v1/{ours['token']}/telemetry", json={"t": 21.5})
            got = await answer(ws, "telemetry")
            assert got["device_id"] == ours["id"]
            assert got["data"]["t"]["value"] == 21.5
            # The sysadmin sees both tenants.
            seen = set()
            while seen != {ours["id"], theirs["id"]}:
                seen.add((await answer(sysadmin, "telemetry"))["device_id"])
            # Nothing of globex was queued for acme's client.
            await api.ok(
                "PATCH", f"/api/devices/{ours['id']}", json={"status": "ok"}, headers=api.admin
            )
            change = await answer(ws, "device")
            assert change["device_id"] == ours["id"] and change["data"]["status"] == "ok"


async def test_a_client_that_does_not_read_never_slows_ingestion(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        tenant = await api.tenant("acme")
        device = await api.device(api.admin, "fast", tenant_id=tenant["id"])
        async with live(base_of(api), api.admin) as ws:
            await subscribe(ws, ["telemetry"], device["id"])
            # The client reads nothing while 300 messages are stored, each answered 200.
            for i in range(300):
                await api.ok(
                    "POST", f"/api/v1/{device['token']}/telemetry", json={"n": i, f"k{i % 7}": i}
                )
            # Then it reads, and the newest value of every key is there.
            latest: dict[str, Any] = {}
            async with asyncio.timeout(15):
                while latest.get("n", {}).get("value") != 299:
                    message = await answer(ws, "telemetry")
                    latest.update(message["data"])
            for k in range(7):
                assert latest[f"k{k}"]["value"] == max(i for i in range(300) if i % 7 == k)


@pytest.mark.postgres
async def test_live_values_cross_from_the_ingest_role_to_the_api_role(
    pg_url: str, tmp_path: Path
) -> None:
    api_port, ingest_ops, mqtt_port = free_port(), free_port(), free_port()
    api_env = platform_env(tmp_path / "api", IIOT_DATABASE_URL=pg_url, IIOT_HTTP_PORT=str(api_port))
    ingest_env = platform_env(
        tmp_path / "ingest",
        IIOT_DATABASE_URL=pg_url,
        IIOT_HTTP_PORT=str(ingest_ops),
        IIOT_MQTT_PORT=str(mqtt_port),
    )
    base = f"http://127.0.0.1:{api_port}"
    with (
        platform_process(api_env, "--role", "api"),
        platform_process(ingest_env, "--role", "ingest"),
    ):
        async with api_client(base) as (api, admin):
            tenant = await api.ok("POST", "/api/tenants", 201, json={"name": "a"}, headers=admin)
            device = await api.ok(
                "POST",
                "/api/devices",
                201,
                json={"name": "d", "tenant_id": tenant["id"]},
                headers=admin,
            )
            async with live(base, admin) as ws:
                await subscribe(ws, ["telemetry"], device["id"])
                await asyncio.to_thread(_publish, mqtt_port, device, {"over_mqtt": 7.5})
                got = await answer(ws, "telemetry")
                assert got["data"]["over_mqtt"]["value"] == 7.5


@contextlib.asynccontextmanager
async def api_client(base: str) -> AsyncIterator[tuple[Any, dict[str, str]]]:
    import httpx

    from tests.e2e.api_helpers import bearer

    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        api = Api(client, None, {})  # type: ignore[arg-type]
        answer = await client.post(
            "/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        assert answer.status_code == 200, answer.text
        yield api, bearer(answer.json()["access_token"])


def _publish(port: int, device: dict[str, Any], payload: dict[str, Any]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cross-role")
    client.username_pw_set(device["id"], device["token"])
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        info = client.publish(f"devices/{device['id']}/telemetry", json.dumps(payload), qos=1)
        info.wait_for_publish(15)
    finally:
        client.loop_stop()
        client.disconnect()
