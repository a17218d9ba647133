"""Commands across platform processes on PostgreSQL: a SIGKILL and restart while a
persistent command is QUEUED or SENT (ThingsBoard #11642), and a command made in one
process reaching a device that polls another."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx

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
