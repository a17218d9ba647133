"""Commands and attributes end to end over the HTTP device API, on PostgreSQL: a device
long-polls with httpx exactly as a ThingsBoard HTTP device does."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.api_helpers import Api, api_platform


async def _device(api: Api, name: str = "valve") -> tuple[dict[str, Any], dict[str, Any]]:
    tenant = await api.tenant(f"tenant-of-{name}")
    return tenant, await api.device(api.admin, name, tenant_id=tenant["id"])


async def _poll(api: Api, token: str, timeout_ms: int = 10_000) -> httpx.Response:
    return await api.client.get(f"/api/v1/{token}/rpc", params={"timeout": timeout_ms})


async def _answering_device(api: Api, token: str, answer: Any, polls: int = 1) -> list[Any]:
    """Poll for commands and answer each; returns what the device received."""
    received = []
    for _ in range(polls):
        poll = await _poll(api, token)
        assert poll.status_code == 200, poll.text
        command = poll.json()
        received.append(command)
        reply = await api.client.post(f"/api/v1/{token}/rpc/{command['id']}", json=answer)
        assert reply.status_code == 200, reply.text
    return received


async def _until(api: Api, url: str, status: str) -> dict[str, Any]:
    for _ in range(200):
        command: dict[str, Any] = await api.ok("GET", url, headers=api.admin)
        if command["status"] == status:
            return command
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never became {status}: {command}")


async def test_two_way_command_and_attributes_over_http(tmp_path: Path, pg_url: str) -> None:
    async with api_platform(tmp_path, IIOT_DATABASE_URL=pg_url) as api:
        _, device = await _device(api)
        token = device["token"]
        device_side = asyncio.create_task(_answering_device(api, token, {"open": True}))
        await asyncio.sleep(0.3)  # the device is polling
        answer = await api.client.post(
            f"/api/devices/{device['id']}/commands",
            json={"method": "setValve", "params": {"open": 1}},
            headers=api.admin,
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["status"] == "SUCCESSFUL" and body["response"] == {"open": True}
        assert [t["status"] for t in body["transitions"]] == [
            "QUEUED",
            "SENT",
            "DELIVERED",
            "SUCCESSFUL",
        ]
        received = await device_side
        assert received == [{"id": body["id"], "method": "setValve", "params": {"open": 1}}]
        stored = await api.ok("GET", f"/api/commands/{body['id']}", headers=api.admin)
        assert stored["status"] == "SUCCESSFUL" and stored["sent_by"] is not None
        metrics = (await api.client.get("/metrics")).text
        assert 'iiot_command_transitions_total{status="SUCCESSFUL"} 1.0' in metrics

        # Shared attributes set over REST reach the polling device; deletions too.
        updates = asyncio.create_task(
            api.client.get(f"/api/v1/{token}/attributes/updates", params={"timeout": 10_000})
        )
        await asyncio.sleep(0.3)
        await api.ok(
            "PUT",
            f"/api/devices/{device['id']}/attributes/shared",
            204,
            json={"interval": 30, "mode": {"eco": True}},
            headers=api.admin,
        )
        pushed = await updates
        assert pushed.status_code == 200 and pushed.json() == {
            "interval": 30,
            "mode": {"eco": True},
        }

        # Client attributes reported by the device; requested back with ThingsBoard's form.
        reported = await api.client.post(f"/api/v1/{token}/attributes", json={"fw": "1.2"})
        assert reported.status_code == 200, reported.text
        asked = await api.client.get(
            f"/api/v1/{token}/attributes", params={"clientKeys": "fw", "sharedKeys": "interval"}
        )
        assert asked.json() == {"client": {"fw": "1.2"}, "shared": {"interval": 30}}
        await api.ok(
            "PUT",
            f"/api/devices/{device['id']}/attributes/server",
            204,
            json={"site": "north"},
            headers=api.admin,
        )
        every = await api.ok("GET", f"/api/devices/{device['id']}/attributes", headers=api.admin)
        assert every["client"]["fw"]["value"] == "1.2" and every["client"]["fw"]["ts"] > 0
        assert every["server"]["site"]["value"] == "north"
        assert set(every["shared"]) == {"interval", "mode"}
        hidden = await api.client.get(f"/api/v1/{token}/attributes")
        assert "site" not in str(hidden.json())
        await api.ok(
            "DELETE",
            f"/api/devices/{device['id']}/attributes/shared",
            204,
            params={"keys": "mode"},
            headers=api.admin,
        )
        shared = await api.ok(
            "GET",
            f"/api/devices/{device['id']}/attributes",
            params={"scope": "shared"},
            headers=api.admin,
        )
        assert list(shared["shared"]) == ["interval"]

        # Bad attributes are refused with a reason.
        too_long = await api.client.put(
            f"/api/devices/{device['id']}/attributes/shared",
            json={"k" * 256: 1},
            headers=api.admin,
        )
        assert too_long.status_code == 400 and "255" in too_long.text
        too_big = await api.client.post(
            f"/api/v1/{token}/attributes", json={"blob": "x" * (65 * 1024)}
        )
        assert too_big.status_code == 400 and "65536" in too_big.text

        # Client-side RPC.
        now = await api.client.post(f"/api/v1/{token}/rpc", json={"method": "getTime"})
        assert now.status_code == 200 and now.json()["time"] > 0
        limits = await api.client.post(
            f"/api/v1/{token}/rpc", json={"method": "getSessionLimits", "params": {}}
        )
        assert limits.json()["maxPayloadSize"] == 65536
        unknown = await api.client.post(f"/api/v1/{token}/rpc", json={"method": "reboot"})
        assert unknown.status_code == 400 and "unknown method" in unknown.json()["error"]


async def test_offline_device_and_reconnect(tmp_path: Path, pg_url: str) -> None:
    async with api_platform(tmp_path, IIOT_DATABASE_URL=pg_url) as api:
        _, device = await _device(api)
        token = device["token"]
        url = f"/api/devices/{device['id']}/commands"
        # Lightweight to an offline device: fails soon (1 s) with a clear state.
        offline = await api.client.post(url, json={"method": "ping"}, headers=api.admin)
        assert offline.status_code == 504
        assert offline.json()["status"] == "FAILED" and "not connected" in offline.json()["error"]
        # Persistent: queued, and never DELIVERED while the device is away (#7123).
        first = await api.ok(
            "POST", url, 202, json={"method": "a", "persistent": True}, headers=api.admin
        )
        second = await api.ok(
            "POST", url, 202, json={"method": "b", "persistent": True}, headers=api.admin
        )
        assert first["status"] == "QUEUED"
        await asyncio.sleep(1.0)
        queued = await api.ok("GET", url, params={"status": "QUEUED"}, headers=api.admin)
        assert queued["total"] == 2
        states = {t["status"] for c in queued["items"] for t in c["transitions"]}
        assert states == {"QUEUED"}
        # The device connects: delivered in creation order, and still after each reconnect
        # (#2898: one poll per command, so every command arrives on a new connection).
        received = await _answering_device(api, token, "done", polls=2)
        assert [c["id"] for c in received] == [first["id"], second["id"]]
        for command in (first, second):
            done = await _until(api, f"/api/commands/{command['id']}", "SUCCESSFUL")
            assert done["response"] == "done"
        third = await api.ok(
            "POST", url, 202, json={"method": "c", "persistent": True}, headers=api.admin
        )
        again = await _answering_device(api, token, "later")
        assert again[0]["id"] == third["id"]
        # An empty poll ends with 408 after its timeout.
        idle = await _poll(api, token, timeout_ms=200)
        assert idle.status_code == 408


async def test_a_device_between_two_polls_still_gets_a_lightweight_command(
    tmp_path: Path,
) -> None:
    async with api_platform(tmp_path) as api:
        _, device = await _device(api)
        url = f"/api/devices/{device['id']}/commands"
        # Sent while the device has no poll open; its next poll comes 0.3 s later.
        sending = asyncio.create_task(
            api.client.post(url, json={"method": "ping"}, headers=api.admin)
        )
        await asyncio.sleep(0.3)
        received = await _answering_device(api, device["token"], {"pong": True})
        answer = await sending
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "SUCCESSFUL"
        assert answer.json()["response"] == {"pong": True}
        assert received[0]["id"] == answer.json()["id"]


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> dict[str, str]:
    """The platform's database: its embedded SQLite file, or a fresh PostgreSQL one."""
    if request.param == "sqlite":
        return {}
    return {"IIOT_DATABASE_URL": str(request.getfixturevalue("pg_url"))}


async def test_expiry_retries_cancel_and_roles(tmp_path: Path, database: dict[str, str]) -> None:
    async with api_platform(tmp_path, **database) as api:
        tenant, device = await _device(api)
        token = device["token"]
        url = f"/api/devices/{device['id']}/commands"
        soon = int(time.time() * 1000) + 500
        expiring = await api.ok(
            "POST",
            url,
            202,
            json={"method": "x", "persistent": True, "expires_at": soon},
            headers=api.admin,
        )
        await _until(api, f"/api/commands/{expiring['id']}", "EXPIRED")

        # A one-way command the device took is final at DELIVERED: its expiry changes nothing.
        soon = int(time.time() * 1000) + 1000
        oneway = await api.ok(
            "POST",
            url,
            202,
            json={"method": "o", "persistent": True, "oneway": True, "expires_at": soon},
            headers=api.admin,
        )
        left = await api.ok(
            "POST",
            url,
            202,
            json={"method": "l", "persistent": True, "expires_at": soon},
            headers=api.admin,
        )
        assert (await _poll(api, token)).json()["id"] == oneway["id"]
        await _until(api, f"/api/commands/{oneway['id']}", "DELIVERED")
        await _until(api, f"/api/commands/{left['id']}", "EXPIRED")
        still = await api.ok("GET", f"/api/commands/{oneway['id']}", headers=api.admin)
        assert still["status"] == "DELIVERED"

        canceled = await api.ok(
            "POST", url, 202, json={"method": "y", "persistent": True}, headers=api.admin
        )
        gone = await api.ok("DELETE", f"/api/commands/{canceled['id']}", headers=api.admin)
        assert gone["status"] == "CANCELED"
        idle = await _poll(api, token, timeout_ms=300)
        assert idle.status_code == 408  # a canceled command never reaches the device

        # One retry: the device takes the command but does not answer; it comes again with
        # the same id, and the answer to the second attempt completes it.
        retried = await api.ok(
            "POST",
            url,
            202,
            json={"method": "z", "persistent": True, "timeout_ms": 500, "retries": 1},
            headers=api.admin,
        )
        silent = await _poll(api, token)
        assert silent.json()["id"] == retried["id"]
        await _answering_device(api, token, {"ok": 1})
        done = await _until(api, f"/api/commands/{retried['id']}", "SUCCESSFUL")
        path = [t["status"] for t in done["transitions"]]
        assert path == [
            "QUEUED",
            "SENT",
            "DELIVERED",
            "TIMEOUT",
            "QUEUED",
            "SENT",
            "DELIVERED",
            "SUCCESSFUL",
        ]
        assert done["attempts"] == 2
        late = await api.client.delete(f"/api/commands/{retried['id']}", headers=api.admin)
        assert late.status_code == 409 and "SUCCESSFUL" in late.text

        # No retry left: TIMEOUT stays.
        once = await api.ok(
            "POST",
            url,
            202,
            json={"method": "w", "persistent": True, "timeout_ms": 300},
            headers=api.admin,
        )
        assert (await _poll(api, token)).json()["id"] == once["id"]
        await _until(api, f"/api/commands/{once['id']}", "TIMEOUT")

        # A tenant_user reads commands but cannot send or cancel them.
        _, reader = await api.user("reader", "tenant_user", tenant["id"])
        refused = await api.client.post(url, json={"method": "x"}, headers=reader)
        assert refused.status_code == 403
        page = await api.ok("GET", url, headers=reader)
        assert page["total"] == 6
        # Another tenant sees nothing.
        other = await api.tenant("other")
        _, stranger = await api.user("stranger", "tenant_admin", other["id"])
        hidden = await api.client.get(f"/api/commands/{once['id']}", headers=stranger)
        assert hidden.status_code == 404
        bad = await api.client.post(url, json={"method": "x", "timeout_ms": 5}, headers=api.admin)
        assert bad.status_code == 400


async def test_commands_sent_at_once_reach_one_poll_each_in_order(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        _, device = await _device(api)
        url = f"/api/devices/{device['id']}/commands"
        first_poll = asyncio.create_task(_poll(api, device["token"]))
        await asyncio.sleep(0.3)  # the device is polling: one open poll takes one command
        sent = await asyncio.gather(
            *(
                api.client.post(
                    url, json={"method": f"step{i}", "persistent": True}, headers=api.admin
                )
                for i in range(3)
            )
        )
        assert [answer.status_code for answer in sent] == [202, 202, 202]
        received = [(await first_poll).json()]
        for _ in range(2):
            poll = await _poll(api, device["token"])
            assert poll.status_code == 200, poll.text
            received.append(poll.json())
        # Each went out once, on its own poll, oldest first: no poll was offered a second
        # command while it answered the first (which would have failed and re-queued it).
        commands = [
            await _until(api, f"/api/commands/{answer.json()['id']}", "DELIVERED")
            for answer in sent
        ]
        created = {c["id"]: c["created_at"] for c in commands}
        assert sorted(created) == sorted(c["id"] for c in received)
        # Oldest first (commands made in the same millisecond have no order among them).
        order = [created[c["id"]] for c in received]
        assert order == sorted(order)
        for command in commands:
            assert [t["status"] for t in command["transitions"]] == ["QUEUED", "SENT", "DELIVERED"]
            assert command["error"] is None and command["attempts"] == 1
