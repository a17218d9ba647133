"""The web console in a real Chromium: login, devices, live values, chart, alarms, commands."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import paho.mqtt.client as mqtt
from playwright.async_api import expect

from tests.browser.conftest import Console, require_api
from tests.support import ADMIN_PASSWORD


async def _clean(con: Console) -> None:
    assert con.foreign_requests() == [], con.foreign_requests()
    assert con.real_errors() == [], con.real_errors()


async def _tenant_admin(con: Console, tenant: str = "acme") -> tuple[dict[str, Any], str]:
    t = await con.api("POST", "/api/tenants", 201, json={"name": tenant}, headers=con.admin)
    body = {
        "username": f"{tenant}-admin",
        "password": "password-123",
        "role": "tenant_admin",
        "tenant_id": t["id"],
    }
    await con.api("POST", "/api/users", 201, json=body, headers=con.admin)
    return t, f"{tenant}-admin"


async def _device(con: Console, tenant_id: str, name: str) -> dict[str, Any]:
    device: dict[str, Any] = await con.api(
        "POST", "/api/devices", 201, json={"name": name, "tenant_id": tenant_id}, headers=con.admin
    )
    return device


def _mqtt_publish(port: int, device: dict[str, Any], payload: dict[str, Any]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dev-{device['id'][:8]}")
    client.username_pw_set(device["id"], device["token"])
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(
            f"devices/{device['id']}/telemetry", json.dumps(payload), qos=1
        ).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


async def test_login_shows_the_api_error_and_logout_ends_the_session(console: Console) -> None:
    page = console.page
    await page.goto(console.base + "/")
    await page.get_by_label("Username").fill("admin")
    await page.get_by_label("Password").fill("wrong-password")
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("alert")).to_have_text("wrong username or password")

    await console.login()
    await expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    # A session whose token has expired is over, also after a reload.
    await page.evaluate(
        """() => { const s = JSON.parse(sessionStorage.getItem('iiot.session'));
        s.expiresAt = Date.now() - 1000;
        sessionStorage.setItem('iiot.session', JSON.stringify(s)); }"""
    )
    await page.reload()
    await expect(page.get_by_role("button", name="Log in")).to_be_visible()
    await console.login()
    await page.get_by_role("button", name="Log out").click()
    await expect(page.get_by_role("button", name="Log in")).to_be_visible()
    await page.reload()  # the session is gone, not just hidden
    await expect(page.get_by_role("button", name="Log in")).to_be_visible()
    await _clean(console)


async def test_an_empty_platform_leads_to_the_first_device_whose_token_shows_once(
    console: Console,
) -> None:
    page = console.page
    _tenant, admin = await _tenant_admin(console)
    await console.login(admin, "password-123")
    await page.get_by_role("link", name="Create your first device").click()
    await page.get_by_label("Name").fill("press-1")
    await page.get_by_role("button", name="Create", exact=True).click()

    panel = page.get_by_role("region", name="Device token")
    await expect(panel).to_contain_text("shown only this once")
    token = (await panel.locator("pre").first.inner_text()).strip()
    assert len(token) >= 24
    await expect(panel.get_by_role("button", name="Copy token")).to_be_visible()
    # The new device works with that token (the first-message command on the panel).
    await console.api("POST", f"/api/v1/{token}/telemetry", json={"temperature": 21.5})
    await expect(page.get_by_role("link", name="press-1")).to_be_visible()

    await page.reload()
    await expect(page.get_by_role("link", name="press-1")).to_be_visible()
    assert token not in await page.content()  # shown once: never again
    await _clean(console)


async def test_values_over_http_and_mqtt_appear_live_on_the_device_page(console: Console) -> None:
    page = console.page
    tenant, _ = await _tenant_admin(console)
    device = await _device(console, tenant["id"], "boiler-7")
    now = int(time.time() * 1000)
    # A day of one-minute points, with an hour of silence (drawn as a gap).
    points = [
        {
            "ts": now - i * 60_000,
            "values": {
                "temperature": round(21 + 4 * math.sin(i / 150) + (i % 7) / 10, 2),
                "pressure": round(1.2 + 0.15 * math.cos(i / 110), 3),
            },
        }
        for i in range(1, 1400)
        if not 600 <= i < 660
    ]
    await console.api("POST", f"/api/v1/{device['token']}/telemetry", json=points)
    await console.login()
    await page.goto(f"{console.base}/#/devices/{device['id']}")
    await expect(page.locator("#latest tr[data-key=temperature]")).to_be_visible()
    await page.wait_for_function("() => document.querySelector('#chart canvas') !== null")

    await console.api("POST", f"/api/v1/{device['token']}/telemetry", json={"http_value": 42.5})
    await expect(page.locator("#latest tr[data-key=http_value]")).to_contain_text("42.5")

    await asyncio.to_thread(_mqtt_publish, console.mqtt_port, device, {"mqtt_value": 17})
    await expect(page.locator("#latest tr[data-key=mqtt_value]")).to_contain_text("17")
    await console.screenshot("device", full_page=True)

    await page.get_by_role("link", name="Overview").click()
    await expect(page.get_by_role("heading", name="Open alarms")).to_be_visible()
    await console.screenshot("overview")
    await _clean(console)


async def test_the_chart_draws_the_stored_points_of_24_hours(console: Console) -> None:
    page = console.page
    tenant, _ = await _tenant_admin(console)
    device = await _device(console, tenant["id"], "meter-1")
    now = int(time.time() * 1000)
    minute = 60_000
    # One point a minute over the last 23 h 20 min (24 h buckets are a minute wide).
    base = now - now % minute
    points = [{"ts": base - i * minute, "values": {"power": float(i % 97)}} for i in range(1, 1401)]
    await console.api("POST", f"/api/v1/{device['token']}/telemetry", json=points)
    await console.login()
    await page.goto(f"{console.base}/#/devices/{device['id']}")
    chart = page.locator("#chart")
    await expect(chart).to_have_attribute("data-points", "1400")
    await expect(chart).to_have_attribute("data-interval", "1m")
    await expect(chart.locator("canvas")).to_be_visible()
    # The canvas holds drawn pixels, not a blank area.
    drawn = await page.evaluate(
        """() => { const c = document.querySelector('#chart canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"""
    )
    assert drawn > 1000
    # 1 h asks for finer buckets.
    await page.get_by_label("Range").select_option("1h")
    await expect(chart).to_have_attribute("data-interval", "2s")
    await _clean(console)


async def test_a_tenant_user_sees_no_admin_controls(console: Console) -> None:
    page = console.page
    tenant, _ = await _tenant_admin(console)
    device = await _device(console, tenant["id"], "pump-3")
    body = {
        "username": "viewer",
        "password": "password-123",
        "role": "tenant_user",
        "tenant_id": tenant["id"],
    }
    await console.api("POST", "/api/users", 201, json=body, headers=console.admin)
    await console.login("viewer", "password-123")
    nav = page.get_by_role("navigation", name="Main")
    await expect(nav.get_by_role("link", name="Devices")).to_be_visible()
    await expect(nav.get_by_role("link", name="Administration")).to_have_count(0)
    await nav.get_by_role("link", name="Devices").click()
    await expect(page.get_by_role("link", name="pump-3")).to_be_visible()
    for label in ("Create device", "Delete pump-3", "Rename pump-3", "Rotate token of pump-3"):
        await expect(page.get_by_role("button", name=label)).to_have_count(0)
    await page.get_by_role("link", name="pump-3").click()
    await expect(page.get_by_role("heading", name="Latest values")).to_be_visible()
    await expect(page.get_by_role("button", name="Send")).to_have_count(0)
    await expect(page.get_by_role("button", name="Set shared attribute")).to_have_count(0)
    await page.goto(f"{console.base}/#/admin")
    await expect(page.get_by_role("heading", name="Administration")).to_have_count(0)
    assert device["id"]
    await _clean(console)


async def test_another_tenants_device_url_shows_not_found(console: Console) -> None:
    page = console.page
    _tenant, admin = await _tenant_admin(console, "acme")
    other, _ = await _tenant_admin(console, "globex")
    theirs = await _device(console, other["id"], "secret-press")
    await console.login(admin, "password-123")
    await page.goto(f"{console.base}/#/devices/{theirs['id']}")
    await expect(page.get_by_role("heading", name="Device not found")).to_be_visible()
    assert "secret-press" not in await page.content()
    await _clean(console)


async def test_alarms_can_be_acknowledged(console: Console) -> None:
    page = console.page
    require_api(await console.http.get("/api/alarms", headers=console.admin), "The alarms API")
    _tenant, admin = await _tenant_admin(console)
    headers = await console.login_headers(admin, "password-123")
    device = await console.api(
        "POST", "/api/devices", 201, json={"name": "oven-2"}, headers=headers
    )
    rule = {
        "name": "Overheating",
        "target": {"device_id": device["id"]},
        "key": "temperature",
        "severity": "MAJOR",
        "create": {"op": "gt", "value": 80},
    }
    await console.api("POST", "/api/rules", 201, json=rule, headers=headers)
    await console.api("POST", f"/api/v1/{device['token']}/telemetry", json={"temperature": 95})
    await console.login(admin, "password-123")
    await page.get_by_role("link", name="Alarms", exact=True).click()
    row = page.locator("table.alarms tbody tr").first
    await expect(row).to_contain_text("Overheating")
    await expect(row).to_contain_text("ACTIVE_UNACK")
    await console.screenshot("alarms")
    await row.get_by_role("button", name="Acknowledge Overheating").click()
    await expect(page.locator("table.alarms tbody tr").first).to_contain_text("ACTIVE_ACK")
    await _clean(console)


async def test_a_two_way_command_reaches_an_mqtt_device_and_shows_its_answer(
    console: Console,
) -> None:
    page = console.page
    _tenant, admin = await _tenant_admin(console)
    headers = await console.login_headers(admin, "password-123")
    device = await console.api(
        "POST", "/api/devices", 201, json={"name": "valve-9"}, headers=headers
    )
    require_api(
        await console.http.get(f"/api/devices/{device['id']}/commands", headers=headers),
        "The commands API",
    )
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="valve-9")
    client.username_pw_set(device["id"], device["token"])
    prefix = f"devices/{device['id']}/commands/"

    def on_message(c: mqtt.Client, _: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic.startswith(prefix) and not message.topic.endswith("/reply"):
            request = json.loads(message.payload)
            answer = {"done": request["method"], "open": request["params"].get("open")}
            c.publish(message.topic + "/reply", json.dumps(answer), qos=1)

    client.on_message = on_message
    subscribed = asyncio.Event()
    loop = asyncio.get_running_loop()
    client.on_subscribe = lambda *a: loop.call_soon_threadsafe(subscribed.set)
    client.on_connect = lambda c, *a: c.subscribe(prefix + "+", qos=1)
    await asyncio.to_thread(client.connect, "127.0.0.1", console.mqtt_port)
    client.loop_start()
    try:
        await asyncio.wait_for(subscribed.wait(), 15)
        await console.login(admin, "password-123")
        await page.goto(f"{console.base}/#/devices/{device['id']}")
        await page.get_by_label("Method").fill("setValve")
        await page.get_by_label("Params (JSON)").fill('{"open": true}')
        await page.get_by_role("button", name="Send").click()
        result = page.locator("#command-result")
        await expect(result).to_contain_text("SUCCESSFUL")
        await expect(result).to_contain_text('"done":"setValve"')
        await expect(page.locator("#commands tbody tr").first).to_contain_text("SUCCESSFUL")
    finally:
        client.loop_stop()
        client.disconnect()
    await _clean(console)


async def test_docs_and_redoc_render_from_this_origin_only(console: Console) -> None:
    page = console.page

    async def only_here(route: Any) -> None:
        if route.request.url.startswith(console.base):
            await route.continue_()
        else:  # as on a plant network: nothing outside answers
            await route.abort()

    await console.context.route("**/*", only_here)
    await page.goto(console.base + "/docs")
    await expect(page.locator(".opblock").first).to_be_visible()
    await expect(page.get_by_text("/api/auth/login").first).to_be_visible()
    await page.goto(console.base + "/redoc")
    await expect(page.get_by_role("heading", name="IIoT platform").first).to_be_visible()
    await _clean(console)


async def test_the_console_responses_forbid_other_origins(console: Console) -> None:
    for path in ("/", "/console/js/app.js", "/docs"):
        answer = await console.http.get(path)
        assert answer.status_code == 200
        csp = answer.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp
        assert "http" not in csp  # no other origin is allowed anywhere
    assert ADMIN_PASSWORD
