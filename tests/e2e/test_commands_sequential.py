"""`IIOT_COMMANDS_SEQUENTIAL`: a device gets its next command only once the previous one
is finished, over the HTTP long poll (httpx, as a ThingsBoard HTTP device) and the MQTT
endpoint (paho, our topics and ThingsBoard's), on SQLite and PostgreSQL, and a CoAP
observation (libcoap's coap-client); without it all queued commands go at once, as before."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.api_helpers import Api, api_platform
from tests.e2e.sequential_helpers import (
    PahoDevice,
    assert_one_after_another,
    first_ts,
    last_ts,
    persistent,
    until,
)
from tests.e2e.test_coap_device_api import run_coap_client
from tests.e2e.test_commands_coap import coap_observer
from tests.support import free_port

ON = {"IIOT_COMMANDS_SEQUENTIAL": "1"}


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> dict[str, str]:
    """The platform's database: its embedded SQLite file, or a fresh PostgreSQL one."""
    if request.param == "sqlite":
        return {}
    return {"IIOT_DATABASE_URL": str(request.getfixturevalue("pg_url"))}


async def _device(api: Api, name: str) -> dict[str, Any]:
    tenant = await api.tenant(f"tenant-of-{name}")
    device: dict[str, Any] = await api.device(api.admin, name, tenant_id=tenant["id"])
    return device


async def _poll(api: Api, token: str, timeout_ms: int = 15_000) -> httpx.Response:
    return await api.client.get(f"/api/v1/{token}/rpc", params={"timeout": timeout_ms})


async def _http_answer(api: Api, token: str, command_id: str, body: Any) -> None:
    reply = await api.client.post(f"/api/v1/{token}/rpc/{command_id}", json=body)
    assert reply.status_code == 200, reply.text


async def _status(api: Api, command: dict[str, Any]) -> str:
    stored = await api.ok("GET", f"/api/commands/{command['id']}", headers=api.admin)
    status: str = stored["status"]
    return status


async def test_http_poll_gets_the_next_command_only_after_the_answer(
    tmp_path: Path, database: dict[str, str]
) -> None:
    async with api_platform(tmp_path, **ON, **database) as api:
        device = await _device(api, "valve")
        token = device["token"]
        made = [await persistent(api, device, m) for m in ("first", "second", "third")]
        taken = await _poll(api, token)
        assert taken.status_code == 200 and taken.json()["id"] == made[0]["id"]
        for k in (1, 2):
            waiting = asyncio.create_task(_poll(api, token))
            await asyncio.sleep(1.0)
            # The device polls again, but the previous command has no answer yet.
            assert not waiting.done()
            assert await _status(api, made[k]) == "QUEUED"
            await _http_answer(api, token, made[k - 1]["id"], {"step": k - 1})
            taken = await waiting
            assert taken.status_code == 200 and taken.json()["id"] == made[k]["id"]
        await _http_answer(api, token, made[2]["id"], {"step": 2})
        done = [await until(api, c["id"], "SUCCESSFUL") for c in made]
        assert [c["response"] for c in done] == [{"step": 0}, {"step": 1}, {"step": 2}]
        assert_one_after_another(done)


async def test_http_poll_without_the_option_does_not_wait_for_answers(
    tmp_path: Path, database: dict[str, str]
) -> None:
    async with api_platform(tmp_path, **database) as api:
        device = await _device(api, "valve")
        token = device["token"]
        made = [await persistent(api, device, m) for m in ("first", "second", "third")]
        for command in made:  # one poll each, none answered
            taken = await _poll(api, token, timeout_ms=3000)
            assert taken.status_code == 200 and taken.json()["id"] == command["id"]
        delivered = [await until(api, c["id"], "DELIVERED") for c in made]
        assert all(c["response"] is None for c in delivered)


@pytest.mark.parametrize("thingsboard", [False, True], ids=["our-topics", "thingsboard-topics"])
async def test_mqtt_device_gets_one_command_at_a_time_in_order(
    tmp_path: Path, database: dict[str, str], thingsboard: bool
) -> None:
    port = free_port()
    async with api_platform(tmp_path, IIOT_MQTT_PORT=str(port), **ON, **database) as api:
        device = await _device(api, "press")
        mqtt = await PahoDevice.open(port, device, thingsboard=thingsboard)
        try:
            # Made while the device listens: each one's QUEUED event finds it busy.
            made = [await persistent(api, device, m) for m in ("first", "second", "third")]
            for k, command in enumerate(made):
                got = await mqtt.next()
                assert got.method == command["method"]
                if not thingsboard:
                    assert got.command_id == command["id"]
                await mqtt.nothing_for(1.0)
                if k < 2:
                    assert await _status(api, made[k + 1]) == "QUEUED"
                await mqtt.answer(got, {"step": k})
            done = [await until(api, c["id"], "SUCCESSFUL") for c in made]
            assert [c["response"] for c in done] == [{"step": 0}, {"step": 1}, {"step": 2}]
            assert_one_after_another(done)
        finally:
            await mqtt.close()


async def test_mqtt_device_without_the_option_gets_every_command_at_once(
    tmp_path: Path, database: dict[str, str]
) -> None:
    port = free_port()
    async with api_platform(tmp_path, IIOT_MQTT_PORT=str(port), **database) as api:
        device = await _device(api, "press")
        mqtt = await PahoDevice.open(port, device, thingsboard=False)
        try:
            made = [await persistent(api, device, m) for m in ("first", "second", "third")]
            got = [await mqtt.next() for _ in made]  # no answer yet
            assert [g.command_id for g in got] == [c["id"] for c in made]
            delivered = [await until(api, c["id"], "DELIVERED") for c in made]
            assert max(first_ts(c, "SENT") for c in delivered) >= 0
            for k, received in enumerate(got):
                await mqtt.answer(received, k)
            done = [await until(api, c["id"], "SUCCESSFUL") for c in made]
            assert [c["response"] for c in done] == [0, 1, 2]
            # All three were out before the first answer came.
            first_answer = min(last_ts(c, "SUCCESSFUL") for c in done)
            assert all(first_ts(c, "SENT") < first_answer for c in done)
        finally:
            await mqtt.close()


async def test_a_timeout_of_the_command_in_flight_lets_the_next_one_go(
    tmp_path: Path, database: dict[str, str]
) -> None:
    port = free_port()
    async with api_platform(tmp_path, IIOT_MQTT_PORT=str(port), **ON, **database) as api:
        device = await _device(api, "pump")
        mqtt = await PahoDevice.open(port, device, thingsboard=False)
        try:
            retried = await persistent(api, device, "retried", timeout_ms=800, retries=1)
            silent = await persistent(api, device, "silent", timeout_ms=800)
            last = await persistent(api, device, "last")
            # Unanswered, the first times out and is retried before anything behind it.
            first = await mqtt.next()
            again = await mqtt.next()
            assert first.command_id == again.command_id == retried["id"]
            await mqtt.answer(again, "second try")
            # The next one is never answered: its timeout (no retry left) frees the device.
            unanswered = await mqtt.next()
            assert unanswered.command_id == silent["id"]
            final = await mqtt.next()
            assert final.command_id == last["id"]
            await mqtt.answer(final, "ok")
            done = [
                await until(api, retried["id"], "SUCCESSFUL"),
                await until(api, silent["id"], "TIMEOUT"),
                await until(api, last["id"], "SUCCESSFUL"),
            ]
            assert [t["status"] for t in done[0]["transitions"]] == [
                "QUEUED",
                "SENT",
                "DELIVERED",
                "TIMEOUT",
                "QUEUED",
                "SENT",
                "DELIVERED",
                "SUCCESSFUL",
            ]
            assert first_ts(done[1], "SENT") >= last_ts(done[0], "SUCCESSFUL")
            assert first_ts(done[2], "SENT") >= last_ts(done[1], "TIMEOUT")
        finally:
            await mqtt.close()


async def test_a_lightweight_command_waits_its_turn_within_its_timeout(
    tmp_path: Path, pg_url: str
) -> None:
    port = free_port()
    async with api_platform(
        tmp_path, IIOT_MQTT_PORT=str(port), IIOT_DATABASE_URL=pg_url, **ON
    ) as api:
        device = await _device(api, "drive")
        url = f"/api/devices/{device['id']}/commands"
        mqtt = await PahoDevice.open(port, device, thingsboard=False)
        try:
            busy = await persistent(api, device, "calibrate")
            in_flight = await mqtt.next()
            await until(api, busy["id"], "DELIVERED")
            # Its timeout passes while it waits: 504, and the device never sees it.
            short = await api.client.post(
                url, json={"method": "quick", "timeout_ms": 500}, headers=api.admin
            )
            assert short.status_code == 504, short.text
            assert [t["status"] for t in short.json()["transitions"]] == ["QUEUED", "TIMEOUT"]
            # A longer one waits behind the persistent command, then goes.
            waiting = asyncio.create_task(
                api.client.post(
                    url, json={"method": "read", "timeout_ms": 15_000}, headers=api.admin
                )
            )
            await mqtt.nothing_for(1.0)
            await mqtt.answer(in_flight, "calibrated")
            got = await mqtt.next()
            assert got.method == "read"
            await mqtt.answer(got, {"rpm": 900})
            answer = await waiting
            assert answer.status_code == 200, answer.text
            assert answer.json()["response"] == {"rpm": 900}
            done = await until(api, busy["id"], "SUCCESSFUL")
            assert first_ts(answer.json(), "SENT") >= last_ts(done, "SUCCESSFUL")
        finally:
            await mqtt.close()


async def test_coap_observer_gets_the_next_command_only_after_the_answer(
    tmp_path: Path, pg_url: str
) -> None:
    port = free_port(socket.SOCK_DGRAM)
    env = {"IIOT_COAP_PORT": str(port), "IIOT_DATABASE_URL": pg_url, **ON}
    async with api_platform(tmp_path, **env) as api:
        device = await _device(api, "meter")
        base = f"coap://127.0.0.1:{port}/api/v1/{device['token']}"
        made = [await persistent(api, device, m) for m in ("first", "second")]
        async with coap_observer(f"{base}/rpc") as notifications:
            first = await asyncio.wait_for(notifications.get(), 20)
            assert first["id"] == made[0]["id"]
            await until(api, made[0]["id"], "DELIVERED")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(notifications.get(), 1.5)
            assert await _status(api, made[1]) == "QUEUED"
            await run_coap_client("-m", "post", "-e", '"ok"', f"{base}/rpc/{first['id']}")
            second = await asyncio.wait_for(notifications.get(), 20)
            assert second["id"] == made[1]["id"]
        answered = await until(api, made[0]["id"], "SUCCESSFUL")
        assert_one_after_another([answered, await until(api, made[1]["id"], "DELIVERED")])
