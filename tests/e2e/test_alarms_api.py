"""Alarms through the REST API, raised by rules on telemetry that devices send over HTTP."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from tests.e2e.alarm_helpers import db_env, now_ms, rule_body, send, wait_for
from tests.e2e.api_helpers import Api, api_platform

__all__ = ["db_env"]  # the fixture


async def tenant_setup(api: Api, name: str = "acme") -> dict[str, Any]:
    tenant = await api.tenant(name)
    _, admin = await api.user(f"{name}-admin", "tenant_admin", tenant["id"])
    _, operator = await api.user(f"{name}-operator", "tenant_user", tenant["id"])
    device = await api.device(admin, "boiler-1")
    return {"tenant": tenant, "admin": admin, "operator": operator, "device": device}


async def alarms_of(api: Api, headers: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    page = await api.ok("GET", "/api/alarms", params=params, headers=headers)
    assert page["total"] == len(page["items"]) or page["total"] > len(page["items"])
    items: list[dict[str, Any]] = page["items"]
    return items


async def test_threshold_alarm_lifecycle_with_hysteresis(
    tmp_path: Path, db_env: dict[str, str]
) -> None:
    async with api_platform(tmp_path, **db_env) as api:
        s = await tenant_setup(api)
        admin, operator, dev = s["admin"], s["operator"], s["device"]
        rule = await api.ok(
            "POST",
            "/api/rules",
            201,
            json=rule_body(dev["id"], clear={"op": "lt", "value": 75}),
            headers=admin,
        )
        assert rule["alarm_type"] == "High temperature" and rule["clear"]["op"] == "lt"
        t0 = now_ms()
        await send(api, dev["token"], t0, t=70)
        await send(api, dev["token"], t0 + 1000, t=85)
        [alarm] = await wait_for(lambda: alarms_of(api, admin), lambda a: len(a) == 1)
        assert alarm["status"] == "ACTIVE_UNACK" and alarm["value"] == 85
        assert (alarm["start_ts"], alarm["end_ts"]) == (t0 + 1000, t0 + 1000)
        assert (alarm["device_id"], alarm["rule_id"], alarm["severity"]) == (
            dev["id"],
            rule["id"],
            "MAJOR",
        )
        await send(api, dev["token"], t0 + 2000, t=78)  # between the thresholds
        await send(api, dev["token"], t0 + 3000, t=90)  # still the same alarm
        alarm = await wait_for(
            lambda: api.ok("GET", f"/api/alarms/{alarm['id']}", headers=operator),
            lambda a: a["end_ts"] == t0 + 3000,
        )
        assert alarm["status"] == "ACTIVE_UNACK"
        summary = await api.ok("GET", "/api/alarms/summary", headers=operator)
        assert summary == {
            "CRITICAL": 0,
            "MAJOR": 1,
            "MINOR": 0,
            "WARNING": 0,
            "INDETERMINATE": 0,
            "total": 1,
        }
        # Operators acknowledge, but neither clear nor change rules.
        acked = await api.ok("POST", f"/api/alarms/{alarm['id']}/ack", headers=operator)
        assert acked["status"] == "ACTIVE_ACK" and acked["ack_by"] == "acme-operator"
        await api.ok("POST", f"/api/alarms/{alarm['id']}/clear", 403, headers=operator)
        await api.ok("DELETE", f"/api/rules/{rule['id']}", 403, headers=operator)
        await send(api, dev["token"], t0 + 4000, t=74)  # below the clear threshold
        cleared = await wait_for(
            lambda: api.ok("GET", f"/api/alarms/{alarm['id']}", headers=admin),
            lambda a: a["status"] == "CLEARED_ACK",
        )
        assert cleared["clear_ts"] == t0 + 4000
        # A new crossing opens a new alarm; the list is newest first and filters.
        await send(api, dev["token"], t0 + 5000, t=95)
        items = await wait_for(lambda: alarms_of(api, admin), lambda a: len(a) == 2)
        assert [a["status"] for a in items] == ["ACTIVE_UNACK", "CLEARED_ACK"]
        assert [a["id"] for a in await alarms_of(api, admin, status="CLEARED")] == [alarm["id"]]
        assert await alarms_of(api, admin, severity="CRITICAL") == []
        assert len(await alarms_of(api, admin, type="High temperature", device_id=dev["id"])) == 2
        assert len(await alarms_of(api, admin, start=t0 + 4500)) == 1
        manual = await api.ok("POST", f"/api/alarms/{items[0]['id']}/clear", headers=admin)
        assert manual["status"] == "CLEARED_UNACK"


async def test_rules_crud_and_bad_rules(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        s = await tenant_setup(api)
        other = await tenant_setup(api, "globex")
        admin, dev = s["admin"], s["device"]
        rule = await api.ok("POST", "/api/rules", 201, json=rule_body(dev["id"]), headers=admin)
        listed = await api.ok("GET", "/api/rules", headers=s["operator"])
        assert [r["id"] for r in listed["items"]] == [rule["id"]] and listed["total"] == 1
        replaced = await api.ok(
            "PUT",
            f"/api/rules/{rule['id']}",
            json=rule_body(dev["id"], severity="CRITICAL", alarm_type="Overheat"),
            headers=admin,
        )
        assert (replaced["severity"], replaced["alarm_type"]) == ("CRITICAL", "Overheat")
        patched = await api.ok(
            "PATCH", f"/api/rules/{rule['id']}", json={"enabled": False}, headers=admin
        )
        assert patched["enabled"] is False and patched["severity"] == "CRITICAL"
        # Other tenants' rules answer 404; their devices cannot be targeted.
        await api.ok("GET", f"/api/rules/{rule['id']}", 404, headers=other["admin"])
        await api.ok("DELETE", f"/api/rules/{rule['id']}", 404, headers=other["admin"])
        answer = await api.client.post(
            "/api/rules", json=rule_body(dev["id"]), headers=other["admin"]
        )
        assert answer.status_code == 400 and "not found" in answer.json()["detail"]
        bad = [
            ({**rule_body(dev["id"]), "severity": "HIGH"}, "severity must be one of"),
            ({**rule_body(dev["id"]), "create": {"op": "gt"}}, "create.value is required"),
            ({**rule_body(dev["id"]), "create": {"op": "gt", "value": "x"}}, "must be a number"),
            (rule_body(str(uuid.uuid4())), "not found in the tenant"),
            ({**rule_body(dev["id"]), "target": {"device_id": "x"}}, "not a UUID"),
            ({**rule_body(dev["id"]), "when": "always"}, "unknown field(s)"),
            ([1, 2], "body"),
        ]
        for body, message in bad:
            answer = await api.client.post("/api/rules", json=body, headers=admin)
            assert answer.status_code == 400, answer.text
            assert message in answer.json()["detail"], answer.text
        # The name is unique within a tenant.
        await api.ok(
            "POST",
            "/api/rules",
            409,
            json=rule_body(dev["id"], name="High temperature", alarm_type="a"),
            headers=admin,
        )
        await api.ok("DELETE", f"/api/rules/{rule['id']}", 204, headers=admin)
        await api.ok("GET", f"/api/rules/{rule['id']}", 404, headers=admin)
        # A sysadmin names the tenant.
        await api.ok("POST", "/api/rules", 400, json=rule_body(dev["id"]), headers=api.admin)
        made = await api.ok(
            "POST",
            "/api/rules",
            201,
            json={**rule_body(dev["id"]), "tenant_id": s["tenant"]["id"]},
            headers=api.admin,
        )
        assert made["tenant_id"] == s["tenant"]["id"]


async def test_other_tenants_alarms_answer_404(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        s = await tenant_setup(api)
        other = await tenant_setup(api, "globex")
        await api.ok(
            "POST", "/api/rules", 201, json=rule_body(s["device"]["id"]), headers=s["admin"]
        )
        await send(api, s["device"]["token"], now_ms(), t=99)
        [alarm] = await wait_for(lambda: alarms_of(api, s["admin"]), lambda a: len(a) == 1)
        for method, path in [
            ("GET", f"/api/alarms/{alarm['id']}"),
            ("POST", f"/api/alarms/{alarm['id']}/ack"),
            ("POST", f"/api/alarms/{alarm['id']}/clear"),
        ]:
            await api.ok(method, path, 404, headers=other["admin"])
        await api.ok("POST", f"/api/alarms/{alarm['id']}/ack", 404, headers=other["operator"])
        assert await alarms_of(api, other["admin"]) == []
        assert (await api.ok("GET", "/api/alarms/summary", headers=other["admin"]))["total"] == 0
        assert len(await alarms_of(api, api.admin)) == 1  # the sysadmin sees every tenant
        await api.ok("GET", "/api/alarms", 400, params={"status": "OPEN"}, headers=s["admin"])
        await api.ok("GET", "/api/alarms", 400, params={"severity": "HIGH"}, headers=s["admin"])


async def test_higher_severity_escalates_the_open_alarm_in_place(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        s = await tenant_setup(api)
        dev, admin = s["device"], s["admin"]
        for name, severity, threshold in [("warn", "WARNING", 80), ("crit", "CRITICAL", 90)]:
            body = rule_body(
                dev["id"],
                name=name,
                severity=severity,
                alarm_type="Overheat",
                create={"op": "gt", "value": threshold},
            )
            await api.ok("POST", "/api/rules", 201, json=body, headers=admin)
        t0 = now_ms()
        await send(api, dev["token"], t0, t=85)
        [alarm] = await wait_for(lambda: alarms_of(api, admin), lambda a: len(a) == 1)
        assert alarm["severity"] == "WARNING"
        await send(api, dev["token"], t0 + 1000, t=95)
        [alarm2] = await wait_for(
            lambda: alarms_of(api, admin), lambda a: a[0]["severity"] == "CRITICAL"
        )
        assert alarm2["id"] == alarm["id"] and alarm2["start_ts"] == t0 and alarm2["value"] == 95


async def test_type_targeted_inactivity_rule(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        s = await tenant_setup(api)
        dev, admin = s["device"], s["admin"]
        body = {
            "name": "Silent",
            "kind": "inactivity",
            "target": {"device_type": "default"},
            "severity": "WARNING",
            "timeout_s": 1,
        }
        await api.ok("POST", "/api/rules", 201, json=body, headers=admin)
        [alarm] = await wait_for(lambda: alarms_of(api, admin), lambda a: len(a) == 1)
        assert (alarm["type"], alarm["status"], alarm["device_id"]) == (
            "Silent",
            "ACTIVE_UNACK",
            dev["id"],
        )
        await send(api, dev["token"], now_ms(), t=1)
        await wait_for(
            lambda: api.ok("GET", f"/api/alarms/{alarm['id']}", headers=admin),
            lambda a: a["status"] == "CLEARED_UNACK",
        )


async def test_restart_in_the_middle_of_a_for_duration(
    tmp_path: Path, db_env: dict[str, str]
) -> None:
    """The pending state is persisted: after a restart the alarm is raised when it is due."""
    for_s = 4
    async with api_platform(tmp_path, **db_env) as api:
        s = await tenant_setup(api)
        dev, admin = s["device"], s["admin"]
        await api.ok(
            "POST",
            "/api/rules",
            201,
            json=rule_body(dev["id"], create={"op": "gt", "value": 80, "for_s": for_s}),
            headers=admin,
        )
        t0 = now_ms()
        await send(api, dev["token"], t0, t=90)
        await send(api, dev["token"], t0 + 100, t=91)
        assert await alarms_of(api, admin) == []
    assert now_ms() < t0 + for_s * 1000, "the platform stopped too late to test anything"
    async with api_platform(tmp_path, **db_env) as api:
        admin = await api.login("acme-admin", "password-123")
        [alarm] = await wait_for(lambda: alarms_of(api, admin), lambda a: len(a) == 1)
        # Raised when the condition had held for for_s, counted from before the restart.
        assert alarm["start_ts"] == t0 + for_s * 1000
        assert alarm["value"] == 90
