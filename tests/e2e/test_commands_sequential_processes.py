"""`IIOT_COMMANDS_SEQUENTIAL` across platform processes on PostgreSQL: the device listens
over MQTT on a `--role ingest` process and long-polls HTTP on a `--role api` process, so
both hold a link of it and both try to deliver; still only one command is out at a time,
in creation order."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.api_helpers import Api
from tests.e2e.sequential_helpers import PahoDevice, assert_one_after_another, persistent, until
from tests.e2e.test_commands_restart import _client, _setup
from tests.support import free_port, platform_env, platform_process


async def test_two_processes_holding_links_of_one_device_send_one_at_a_time(
    tmp_path: Path, pg_url: str
) -> None:
    api_port, ingest_port, mqtt_port = free_port(), free_port(), free_port()
    common = {"IIOT_DATABASE_URL": pg_url, "IIOT_COMMANDS_SEQUENTIAL": "1"}
    api_env = platform_env(tmp_path / "api", IIOT_HTTP_PORT=str(api_port), **common)
    ingest_env = platform_env(
        tmp_path / "ingest",
        IIOT_HTTP_PORT=str(ingest_port),
        IIOT_MQTT_PORT=str(mqtt_port),
        **common,
    )
    with (
        platform_process(api_env, "--role", "api"),
        platform_process(ingest_env, "--role", "ingest"),
    ):
        async with _client(api_port) as (client, admin):
            api = Api(client, None, admin)  # type: ignore[arg-type]  # HTTP only
            device = await _setup(client, admin)
            token = device["token"]
            mqtt = await PahoDevice.open(mqtt_port, device, thingsboard=False)
            arrived: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue()

            async def from_mqtt() -> None:
                while True:
                    got = await mqtt.next(600)
                    await arrived.put(("mqtt", str(got.command_id), got))

            async def from_http(poller: httpx.AsyncClient) -> None:
                while True:
                    poll = await poller.get(f"/api/v1/{token}/rpc", params={"timeout": 2000})
                    if poll.status_code == 200:
                        await arrived.put(("http", poll.json()["id"], None))

            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{api_port}", timeout=30
            ) as poller:
                listeners = [
                    asyncio.create_task(from_mqtt()),
                    asyncio.create_task(from_http(poller)),
                ]
                try:
                    await asyncio.sleep(0.5)  # both links attached
                    made = [await persistent(api, device, f"step{k}") for k in range(4)]
                    seen: list[tuple[str, str]] = []
                    for k in range(len(made)):
                        channel, command_id, handle = await asyncio.wait_for(arrived.get(), 20)
                        seen.append((channel, command_id))
                        # While the device holds it, nothing else comes on either link.
                        await asyncio.sleep(1.0)
                        assert arrived.empty(), (seen, arrived.get_nowait())
                        if channel == "mqtt":
                            await mqtt.answer(handle, k)
                        else:
                            reply = await poller.post(f"/api/v1/{token}/rpc/{command_id}", json=k)
                            assert reply.status_code == 200, reply.text
                    assert [c for _, c in seen] == [m["id"] for m in made]
                    done = [await until(api, m["id"], "SUCCESSFUL") for m in made]
                    assert [c["response"] for c in done] == [0, 1, 2, 3]
                    assert_one_after_another(done)
                finally:
                    for task in listeners:
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError, AssertionError):
                            await task
                    await mqtt.close()
