"""Webhooks: signed, retried from the database outbox, delivered once, even across SIGKILL."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import httpx

from iiot.bus import RecordEvent
from tests.e2e.alarm_helpers import db_env, now_ms, rule_body, send, wait_for
from tests.e2e.api_helpers import Api, api_platform, bearer
from tests.e2e.webhook_receiver import receiver
from tests.support import ADMIN_PASSWORD, free_port, platform_env, platform_process

__all__ = ["db_env"]  # the fixture

SECRET = "webhook-secret-for-tests"


async def setup(api: Api, hook_port: int) -> dict[str, str]:
    tenant = await api.tenant("acme")
    _, admin = await api.user("acme-admin", "tenant_admin", tenant["id"])
    device = await api.device(admin, "boiler")
    hook = await api.ok(
        "POST",
        "/api/webhooks",
        201,
        json={
            "url": f"http://127.0.0.1:{hook_port}/hooks/iiot",
            "secret": SECRET,
            "events": ["alarm.raised", "alarm.cleared"],
        },
        headers=admin,
    )
    assert "secret" not in hook
    await api.ok("POST", "/api/rules", 201, json=rule_body(device["id"]), headers=admin)
    return {"token": device["token"], "hook": hook["id"], "device": device["id"], **admin}


async def test_three_failures_then_success_delivers_each_event_once(tmp_path: Path) -> None:
    hook_port = free_port()
    async with (
        receiver(hook_port, SECRET, fail_first=3) as got,
        api_platform(tmp_path) as api,
    ):
        s = await setup(api, hook_port)
        admin = {"Authorization": s["Authorization"]}
        t0 = now_ms()
        await send(api, s["token"], t0, t=90)
        await send(api, s["token"], t0 + 1000, t=20)
        await wait_for(lambda: asyncio.sleep(0, got.accepted), lambda a: len(a) == 2, 60)
        events = sorted(body["event"] for body in got.accepted)
        assert events == ["alarm.cleared", "alarm.raised"]
        assert got.bad_signatures == 0
        assert sorted(got.attempts.values()) == [4, 4]
        raised = next(b for b in got.accepted if b["event"] == "alarm.raised")
        assert raised["data"]["device_id"] == s["device"] and raised["data"]["value"] == 90
        log = await api.ok("GET", f"/api/webhooks/{s['hook']}/deliveries", headers=admin)
        assert log["total"] == 8
        outcomes = sorted((d["event"], d["attempt"], d["outcome"]) for d in log["items"])
        assert outcomes == sorted(
            [(e, n, "retrying") for e in ("alarm.raised", "alarm.cleared") for n in (1, 2, 3)]
            + [("alarm.raised", 4, "delivered"), ("alarm.cleared", 4, "delivered")]
        )
        assert {d["status_code"] for d in log["items"]} == {500, 200}
        await asyncio.sleep(2)  # nothing more arrives
        assert len(got.accepted) == 2


async def test_webhook_crud_and_bad_bodies(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        s = await setup(api, free_port())
        admin = {"Authorization": s["Authorization"]}
        other = await api.tenant("globex")
        _, intruder = await api.user("globex-admin", "tenant_admin", other["id"])
        listed = await api.ok("GET", "/api/webhooks", headers=admin)
        assert [h["id"] for h in listed["items"]] == [s["hook"]]
        await api.ok("GET", f"/api/webhooks/{s['hook']}", 404, headers=intruder)
        await api.ok("GET", f"/api/webhooks/{s['hook']}/deliveries", 404, headers=intruder)
        await api.ok("DELETE", f"/api/webhooks/{s['hook']}", 404, headers=intruder)
        made = await api.ok(
            "POST",
            "/api/webhooks",
            201,
            json={"url": "https://example.com/x", "events": ["command.completed"]},
            headers=admin,
        )
        assert len(made["secret"]) >= 32  # generated, shown once
        assert "secret" not in await api.ok("GET", f"/api/webhooks/{made['id']}", headers=admin)
        for body, message in [
            ({"url": "ftp://x/y", "events": ["alarm.raised"]}, "http or https"),
            ({"url": "http://x/y", "events": []}, "non-empty list"),
            ({"url": "http://x/y", "events": ["alarm.exploded"]}, "unknown event"),
            ({"url": "http://x/y", "events": ["alarm.raised"], "secret": ""}, "secret"),
            ({"url": "http://x/y", "events": ["alarm.raised"], "colour": 1}, "unknown field"),
        ]:
            answer = await api.client.post("/api/webhooks", json=body, headers=admin)
            assert answer.status_code == 400 and message in answer.json()["detail"], answer.text
        await api.ok("DELETE", f"/api/webhooks/{made['id']}", 204, headers=admin)
        await api.ok("GET", f"/api/webhooks/{made['id']}", 404, headers=admin)


async def test_sigkill_between_raising_and_delivery_still_delivers(
    tmp_path: Path, db_env: dict[str, str]
) -> None:
    hook_port, http_port = free_port(), free_port()
    env = platform_env(tmp_path, IIOT_HTTP_PORT=str(http_port), **db_env)
    base = f"http://127.0.0.1:{http_port}"
    with platform_process(env) as proc:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            login = await client.post(
                "/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
            )
            api = Api(client, None, bearer(login.json()["access_token"]))  # type: ignore[arg-type]
            s = await setup(api, hook_port)  # nothing listens there yet
            admin = {"Authorization": s["Authorization"]}
            await send(api, s["token"], now_ms(), t=99)
            await wait_for(
                lambda: api.ok("GET", f"/api/webhooks/{s['hook']}/deliveries", headers=admin),
                lambda log: log["total"] >= 1,
            )
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 30)
    assert proc.returncode == -signal.SIGKILL
    async with receiver(hook_port, SECRET) as got:
        with platform_process(env):
            await wait_for(lambda: asyncio.sleep(0, got.accepted), lambda a: len(a) == 1, 60)
            await asyncio.sleep(1.5)
    [body] = got.accepted
    assert body["event"] == "alarm.raised" and body["data"]["value"] == 99
    assert got.bad_signatures == 0


async def test_completed_commands_are_sent_once(tmp_path: Path) -> None:
    """`command.completed` for a command that reached a final state, once per command."""
    hook_port = free_port()
    async with receiver(hook_port, SECRET) as got, api_platform(tmp_path) as api:
        tenant = await api.tenant("acme")
        _, admin = await api.user("acme-admin", "tenant_admin", tenant["id"])
        device = await api.device(admin, "valve")
        body = {
            "url": f"http://127.0.0.1:{hook_port}/x",
            "secret": SECRET,
            "events": ["command.completed"],
        }
        await api.ok("POST", "/api/webhooks", 201, json=body, headers=admin)
        bus = api.platform.services.bus
        tenant_id, device_id = uuid.UUID(tenant["id"]), uuid.UUID(device["id"])
        sent = {"id": "c1", "status": "SENT"}
        done = {"id": "c1", "status": "SUCCESSFUL", "response": {"open": True}}
        bus.publish(RecordEvent("command", "SENT", tenant_id, device_id, sent))
        # Seen twice, as when another process forwards its own record of it.
        bus.publish(RecordEvent("command", "SUCCESSFUL", tenant_id, device_id, done))
        bus.publish(RecordEvent("command", "SUCCESSFUL", tenant_id, device_id, done))
        await wait_for(lambda: asyncio.sleep(0, got.accepted), lambda a: len(a) == 1)
        await asyncio.sleep(1.5)
    [received] = got.accepted
    assert received["event"] == "command.completed" and received["data"] == done
    assert got.bad_signatures == 0
