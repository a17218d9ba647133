"""Commands and attributes over CoAP with libcoap's `coap-client -s` observing: the ACK of
the confirmable notification makes a command DELIVERED."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.e2e.api_helpers import Api, api_platform
from tests.e2e.test_coap_device_api import coap_client, run_coap_client
from tests.support import free_port


@contextlib.asynccontextmanager
async def coap_observer(url: str) -> AsyncIterator[asyncio.Queue[Any]]:
    """`coap-client -s` observing `url`; yields each JSON notification as it arrives."""
    proc = await asyncio.create_subprocess_exec(
        coap_client(),
        "-s",
        "60",
        "-m",
        "get",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    found: asyncio.Queue[Any] = asyncio.Queue()

    async def read() -> None:
        # coap-client prints each payload as it is, without a newline between them.
        assert proc.stdout is not None
        decoder = json.JSONDecoder()
        text = ""
        while chunk := await proc.stdout.read(4096):
            text += chunk.decode()
            while text.strip():
                try:
                    value, end = decoder.raw_decode(text.lstrip())
                except ValueError:
                    break
                found.put_nowait(value)
                text = text.lstrip()[end:]

    reader = asyncio.create_task(read())
    try:
        yield found
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def _until_attached(api: Api, device_id: str) -> None:
    links = api.platform.services.links
    for _ in range(200):
        if links.connected(uuid.UUID(device_id)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the observation never attached")


async def test_coap_client_observes_commands_and_attributes(tmp_path: Path, pg_url: str) -> None:
    port = free_port(socket.SOCK_DGRAM)
    async with api_platform(tmp_path, IIOT_COAP_PORT=str(port), IIOT_DATABASE_URL=pg_url) as api:
        tenant = await api.tenant("plant")
        device = await api.device(api.admin, "meter", tenant_id=tenant["id"])
        base = f"coap://127.0.0.1:{port}/api/v1/{device['token']}"
        url = f"/api/devices/{device['id']}/commands"
        # Queued while the device is away; delivered when it starts observing.
        queued = await api.ok(
            "POST", url, 202, json={"method": "early", "persistent": True}, headers=api.admin
        )
        async with coap_observer(f"{base}/rpc") as notifications:
            first = await asyncio.wait_for(notifications.get(), 20)
            assert first == {"id": queued["id"], "method": "early", "params": {}}
            await run_coap_client("-m", "post", "-e", '"ok"', f"{base}/rpc/{first['id']}")
            done = await api.ok("GET", f"/api/commands/{queued['id']}", headers=api.admin)
            assert done["status"] == "SUCCESSFUL" and done["response"] == "ok"
            assert "DELIVERED" in [t["status"] for t in done["transitions"]]

            async def answer() -> None:
                command = await asyncio.wait_for(notifications.get(), 20)
                await run_coap_client(
                    "-m",
                    "post",
                    "-e",
                    json.dumps({"v": command["params"]["x"]}),
                    f"{base}/rpc/{command['id']}",
                )

            device_side = asyncio.create_task(answer())
            reply = await api.ok(
                "POST", url, json={"method": "read", "params": {"x": 7}}, headers=api.admin
            )
            await device_side
            assert reply["status"] == "SUCCESSFUL" and reply["response"] == {"v": 7}
            path = [t["status"] for t in reply["transitions"]]
            assert path == ["QUEUED", "SENT", "DELIVERED", "SUCCESSFUL"]

        async with coap_observer(f"{base}/attributes") as updates:
            await _until_attached(api, device["id"])
            await api.ok(
                "PUT",
                f"/api/devices/{device['id']}/attributes/shared",
                204,
                json={"interval": 30},
                headers=api.admin,
            )
            assert await asyncio.wait_for(updates.get(), 20) == {"interval": 30}

        _, err = await run_coap_client("-m", "post", "-e", '{"fw": "3.1"}', f"{base}/attributes")
        assert "4." not in err, err
        asked, _ = await run_coap_client(
            "-m", "get", f"{base}/attributes?clientKeys=fw&sharedKeys=interval"
        )
        assert json.loads(asked) == {"client": {"fw": "3.1"}, "shared": {"interval": 30}}
        now, _ = await run_coap_client("-m", "post", "-e", '{"method": "getTime"}', f"{base}/rpc")
        assert json.loads(now)["time"] > 0
