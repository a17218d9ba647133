"""The console's rules screen in a real Chromium: the rule form against the real rules API."""

from __future__ import annotations

import json
from typing import Any

from playwright.async_api import Page, expect

from tests.browser.conftest import Console, require_api

PASSWORD = "password-123"


async def _clean(con: Console) -> None:
    assert con.foreign_requests() == [], con.foreign_requests()
    assert con.real_errors() == [], con.real_errors()


async def _tenant_with_admin(con: Console, tenant: str = "acme") -> tuple[dict[str, Any], str]:
    require_api(await con.http.get("/api/rules", headers=con.admin), "The rules API")
    t = await con.api("POST", "/api/tenants", 201, json={"name": tenant}, headers=con.admin)
    user = {
        "username": f"{tenant}-admin",
        "password": PASSWORD,
        "role": "tenant_admin",
        "tenant_id": t["id"],
    }
    await con.api("POST", "/api/users", 201, json=user, headers=con.admin)
    return t, f"{tenant}-admin"


async def _rules(con: Console, headers: dict[str, str]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = (await con.api("GET", "/api/rules", headers=headers))["items"]
    return items


async def _open_rules(page: Page) -> None:
    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Rules").click()
    await expect(page.get_by_role("heading", name="New rule")).to_be_visible()


async def test_a_rule_is_created_edited_disabled_and_deleted_through_the_form(
    console: Console,
) -> None:
    page = console.page
    _tenant, admin = await _tenant_with_admin(console)
    headers = await console.login_headers(admin, PASSWORD)
    boiler = await console.api(
        "POST", "/api/devices", 201, json={"name": "boiler-1", "type": "boiler"}, headers=headers
    )
    telemetry = {"ts": 1_767_225_600_000, "values": {"temperature": 70.5, "pressure": 1.2}}
    await console.api("POST", f"/api/v1/{boiler['token']}/telemetry", json=telemetry)
    await console.login(admin, PASSWORD)
    await _open_rules(page)
    await expect(page.get_by_text("No rule yet")).to_be_visible()

    # Keyboard: Tab reaches the kind of rule, arrows choose, and the focus is visible.
    await page.get_by_label("Name", exact=True).fill("Boiler overheating")
    await page.keyboard.press("Tab")
    await expect(page.get_by_label("a value crosses a threshold")).to_be_focused()
    outline = await page.evaluate(
        "() => { const s = getComputedStyle(document.activeElement);"
        " return [s.outlineStyle, s.outlineWidth]; }"
    )
    assert outline == ["solid", "3px"], outline
    await page.keyboard.press("ArrowRight")
    await expect(page.get_by_label("a device sends nothing")).to_be_checked()
    await expect(page.get_by_role("group", name="Raise an alarm when", exact=True)).to_be_hidden()
    await page.keyboard.press("ArrowLeft")
    raise_group = page.get_by_role("group", name="Raise an alarm when", exact=True)
    await expect(raise_group).to_be_visible()

    await page.get_by_label("every device of a type").check()
    await page.get_by_label("Device type").fill("boiler")
    # The keys the boiler sent are offered.
    await expect(page.locator("#rule-keys option[value=temperature]")).to_have_count(1)
    await raise_group.get_by_label("Telemetry key").fill("temperature")
    await raise_group.get_by_role("combobox", name="Condition", exact=True).select_option("gt")
    await raise_group.get_by_label("Value", exact=True).fill("80")
    await raise_group.get_by_label("For at least", exact=True).fill("800")
    await raise_group.get_by_label("For at least: unit").select_option("h")  # > 30 days
    await page.get_by_label("a condition of its own holds (hysteresis)").check()
    clear_group = page.get_by_role("group", name="Clear the alarm when")
    await clear_group.get_by_role("combobox", name="Condition", exact=True).select_option("lt")
    await clear_group.get_by_label("Value", exact=True).fill("75")
    await clear_group.get_by_label("For at least", exact=True).fill("10")
    await page.get_by_label("Severity").select_option("MAJOR")

    sent = {
        "name": "Boiler overheating",
        "kind": "threshold",
        "target": {"device_type": "boiler"},
        "key": "temperature",
        "create": {"op": "gt", "value": 80, "for_s": 2_880_000},
        "clear": {"op": "lt", "value": 75, "for_s": 10},
        "severity": "MAJOR",
        "enabled": True,
    }
    # The advanced JSON view shows exactly what the form sends.
    await page.get_by_text("JSON (advanced)").click()
    shown = page.get_by_label("Rule as JSON")
    await expect(shown).not_to_have_value("")
    assert json.loads(await shown.input_value()) == sent
    await page.get_by_text("JSON (advanced)").click()

    # The API refuses the 800 hours; its message is shown word for word, at the field.
    answer = await console.http.post("/api/rules", json=sent, headers=headers)
    assert answer.status_code == 400
    detail = answer.json()["detail"]
    assert "for_s" in detail
    await page.get_by_role("button", name="Create rule").click()
    await expect(page.locator("#rule-error")).to_have_text(detail)
    await expect(page.locator("#rule-error").get_by_role("alert")).to_be_visible()
    wait_field = raise_group.get_by_label("For at least", exact=True)
    await expect(wait_field).to_have_attribute("aria-invalid", "true")
    await expect(wait_field).to_be_focused()
    assert await _rules(console, headers) == []

    await wait_field.fill("30")
    await raise_group.get_by_label("For at least: unit").select_option("s")
    await page.get_by_role("button", name="Create rule").click()
    row = page.locator("table.rules tbody tr", has_text="Boiler overheating")
    await expect(row).to_contain_text("every device of type boiler")
    await expect(row).to_contain_text("temperature > 80 for 30 s; clears < 75 for 10 s")
    await expect(row).to_contain_text("enabled")
    await expect(page.locator("#rule-error")).to_have_text("")
    [rule] = await _rules(console, headers)
    assert {k: rule[k] for k in sent} == {**sent, "create": {**sent["create"], "for_s": 30}}
    assert rule["alarm_type"] == "Boiler overheating"

    # Edit: the form is filled with the rule; change the device, threshold and severity.
    await row.get_by_role("button", name="Edit Boiler overheating").click()
    await expect(page.get_by_role("heading", name="Edit rule Boiler overheating")).to_be_visible()
    await expect(page.get_by_label("Name", exact=True)).to_be_focused()
    await expect(raise_group.get_by_label("For at least", exact=True)).to_have_value("30")
    await expect(clear_group.get_by_label("Value", exact=True)).to_have_value("75")
    await page.get_by_label("one device").check()
    device_choice = page.get_by_role("combobox", name="Device", exact=True)
    await device_choice.select_option(label="boiler-1 (boiler)")
    await raise_group.get_by_label("Value", exact=True).fill("85.5")
    await page.get_by_label("Severity").select_option("CRITICAL")
    await page.get_by_label("Alarm type").fill("Overheat")
    await console.screenshot("rules", full_page=True)
    await page.emulate_media(color_scheme="dark")
    await console.screenshot("rules-dark", full_page=True)
    await page.emulate_media(color_scheme="light")
    await page.get_by_role("button", name="Save changes").click()
    await expect(page.get_by_role("heading", name="New rule")).to_be_visible()
    await expect(row).to_contain_text("temperature > 85.5 for 30 s")
    await expect(row).to_contain_text("boiler-1")
    [edited] = await _rules(console, headers)
    assert edited["id"] == rule["id"]
    assert edited["target"] == {"device_id": boiler["id"]}
    assert edited["create"] == {"op": "gt", "value": 85.5, "for_s": 30}
    assert edited["clear"] == sent["clear"]
    assert (edited["severity"], edited["alarm_type"]) == ("CRITICAL", "Overheat")

    # Disable, then enable again, from the list.
    await row.get_by_role("button", name="Disable Boiler overheating").click()
    await expect(row).to_have_attribute("data-enabled", "false")
    await expect(row.get_by_role("button", name="Enable Boiler overheating")).to_be_focused()
    assert (await _rules(console, headers))[0]["enabled"] is False
    await row.get_by_role("button", name="Enable Boiler overheating").click()
    await expect(row).to_have_attribute("data-enabled", "true")
    await row.get_by_role("button", name="Disable Boiler overheating").click()
    await expect(row).to_have_attribute("data-enabled", "false")

    # Delete asks first; Cancel keeps the rule.
    await row.get_by_role("button", name="Delete Boiler overheating").click()
    confirm = page.get_by_role("dialog")
    await expect(confirm).to_contain_text("Delete rule Boiler overheating?")
    await confirm.get_by_role("button", name="Cancel").click()
    await expect(confirm).to_have_count(0)
    assert len(await _rules(console, headers)) == 1
    await row.get_by_role("button", name="Delete Boiler overheating").click()
    await page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    await expect(page.get_by_text("No rule yet")).to_be_visible()
    assert await _rules(console, headers) == []
    await _clean(console)


async def test_a_sysadmin_creates_inactivity_and_text_rules_in_a_tenant(console: Console) -> None:
    page = console.page
    tenant, _ = await _tenant_with_admin(console, "globex")
    await _tenant_with_admin(console, "initech")
    pump = await console.api(
        "POST",
        "/api/devices",
        201,
        json={"name": "pump-4", "type": "pump", "tenant_id": tenant["id"]},
        headers=console.admin,
    )
    await console.login()
    await _open_rules(page)
    await page.get_by_label("Tenant").select_option(label="globex")

    # A device going silent for 5 minutes: a warning of its own alarm type, off for now.
    await page.get_by_label("Name", exact=True).fill("Silent pump")
    await page.get_by_label("a device sends nothing").check()
    await page.get_by_label("one device").check()
    device_choice = page.get_by_role("combobox", name="Device", exact=True)
    await device_choice.select_option(label="pump-4 (pump)")
    silent = page.get_by_role("group", name="Raise an alarm when the device has")
    await silent.get_by_label("Nothing received for", exact=True).fill("5")
    await silent.get_by_label("Nothing received for: unit").select_option("min")
    await page.get_by_label("Severity").select_option("WARNING")
    await page.get_by_label("Alarm type").fill("No data")
    await page.get_by_label("Enabled (evaluated)").uncheck()
    await page.get_by_role("button", name="Create rule").click()
    row = page.locator("table.rules tbody tr", has_text="Silent pump")
    await expect(row).to_contain_text("no message for 5 min")
    await expect(row).to_contain_text("globex")
    await expect(row).to_have_attribute("data-enabled", "false")

    # A text state: equals "FAULT" on every pump.
    await page.get_by_label("Name", exact=True).fill("Pump fault")
    await page.get_by_label("every device of a type").check()
    await page.get_by_label("Device type").fill("pump")
    raise_group = page.get_by_role("group", name="Raise an alarm when", exact=True)
    await raise_group.get_by_label("Telemetry key").fill("state")
    await raise_group.get_by_role("combobox", name="Condition", exact=True).select_option("eq")
    await raise_group.get_by_label("Value is").select_option("text")
    await raise_group.get_by_label("Value", exact=True).fill("FAULT")
    await page.get_by_role("button", name="Create rule").click()
    await expect(page.locator("table.rules tbody tr", has_text="Pump fault")).to_contain_text(
        'state = "FAULT"; clears when it no longer holds'
    )

    rules = {r["name"]: r for r in await _rules(console, console.admin)}
    silent_rule, fault = rules["Silent pump"], rules["Pump fault"]
    assert silent_rule["tenant_id"] == fault["tenant_id"] == tenant["id"]
    assert silent_rule["kind"] == "inactivity"
    assert silent_rule["target"] == {"device_id": pump["id"]}
    assert silent_rule["timeout_s"] == 300
    assert (silent_rule["severity"], silent_rule["alarm_type"]) == ("WARNING", "No data")
    assert silent_rule["enabled"] is False
    assert fault["create"] == {"op": "eq", "value": "FAULT", "for_s": 0}
    assert fault["clear"] is None and fault["target"] == {"device_type": "pump"}

    # A name taken in the tenant: the API's conflict, as it says it.
    await expect(page.get_by_label("Telemetry key")).to_have_value("")  # a new rule again
    await page.get_by_label("Name", exact=True).fill("Pump fault")
    await raise_group.get_by_label("Telemetry key").fill("state")
    await raise_group.get_by_label("Value", exact=True).fill("99")
    await page.get_by_role("button", name="Create rule").click()
    conflict = "a rule named 'Pump fault' already exists"
    await expect(page.locator("#rule-error")).to_have_text(conflict)
    await expect(page.get_by_label("Name", exact=True)).to_have_attribute("aria-invalid", "true")

    # Hand-written JSON (advanced) goes to the API as it is; its answer is shown as it says it.
    await page.get_by_text("JSON (advanced)").click()
    editor = page.get_by_label("Rule as JSON")
    await expect(editor).not_to_have_value("")
    written = json.loads(await editor.input_value())
    assert written["tenant_id"] == tenant["id"]  # a sysadmin's new rule names its tenant
    written.update(name="Pump stop", colour="red")
    await editor.fill(json.dumps(written))
    await page.get_by_role("button", name="Save JSON").click()
    await expect(page.locator("#rule-json-error")).to_have_text(
        "unknown field(s) for a threshold rule: colour"
    )
    del written["colour"]
    await editor.fill(json.dumps(written))
    await page.get_by_role("button", name="Save JSON").click()
    await expect(page.locator("table.rules tbody tr", has_text="Pump stop")).to_contain_text(
        "state > 99"
    )
    await _clean(console)


async def test_a_tenant_user_sees_no_rule_edit_controls(console: Console) -> None:
    page = console.page
    tenant, admin = await _tenant_with_admin(console)
    headers = await console.login_headers(admin, PASSWORD)
    rule = {
        "name": "Overheating",
        "target": {"device_type": "default"},
        "key": "temperature",
        "severity": "MAJOR",
        "create": {"op": "gt", "value": 80},
    }
    await console.api("POST", "/api/rules", 201, json=rule, headers=headers)
    viewer = {
        "username": "viewer",
        "password": PASSWORD,
        "role": "tenant_user",
        "tenant_id": tenant["id"],
    }
    await console.api("POST", "/api/users", 201, json=viewer, headers=console.admin)
    await console.login("viewer", PASSWORD)
    nav = page.get_by_role("navigation", name="Main")
    await expect(nav.get_by_role("link", name="Devices")).to_be_visible()
    await nav.get_by_role("link", name="Rules").click()  # to read: rules explain alarms
    await expect(page.get_by_text("Overheating").first).to_be_visible()
    for name in ("New rule", "Create rule", "Edit Overheating", "Delete Overheating"):
        await expect(page.get_by_role("button", name=name)).to_have_count(0)
    await expect(page.get_by_role("button", name="Disable Overheating")).to_have_count(0)
    await expect(page.get_by_label("Name", exact=True)).to_have_count(0)
    await expect(page.get_by_label("Rule as JSON")).to_have_count(0)
    # The API refuses a change from this user anyway.
    viewer_headers = await console.login_headers("viewer", PASSWORD)
    [stored] = await _rules(console, viewer_headers)
    answer = await console.http.patch(
        f"/api/rules/{stored['id']}", json={"enabled": False}, headers=viewer_headers
    )
    assert answer.status_code == 403
    await _clean(console)
