"""Tenant isolation over real HTTP: every route with an id, each role, zero cross-tenant access.

Tenant B's objects must answer exactly like objects that do not exist, every attempted write
must leave them unchanged, and fields a caller may not set are never stored.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt

from tests.e2e.api_helpers import Api, api_platform, bearer

PASSWORD = "password-123"


async def _world(api: Api) -> dict[str, Any]:
    """Two tenants, each with an admin, a user and a device with some telemetry."""
    world: dict[str, Any] = {}
    for name in ("a", "b"):
        tenant = await api.tenant(f"tenant-{name}")
        admin, admin_headers = await api.user(f"{name}-admin", "tenant_admin", tenant["id"])
        user, user_headers = await api.user(f"{name}-user", "tenant_user", tenant["id"])
        device = await api.device(admin_headers, f"{name}-device")
        answer = await api.client.post(
            f"/api/v1/{device['token']}/telemetry", json={"ts": 1767225601000, "values": {"v": 1}}
        )
        assert answer.status_code == 200
        world[name] = {
            "tenant": tenant,
            "admin": admin,
            "user": user,
            "device": device,
            "tenant_admin": admin_headers,
            "tenant_user": user_headers,
        }
    # The telemetry marks each device seen; presence is written within a second. Wait for it,
    # so that the later snapshots compare what tenant A's requests did, not that write.
    for side in world.values():
        await _wait_seen(api, side["device"]["id"])
    return world


async def _wait_seen(api: Api, device_id: str) -> None:
    deadline = time.monotonic() + 10
    url = f"/api/devices/{device_id}"
    while (await api.ok("GET", url, headers=api.admin))["last_seen"] is None:
        assert time.monotonic() < deadline, "device presence was never written"
        await asyncio.sleep(0.05)


def _id_routes(objects: dict[str, str]) -> list[tuple[str, str, Any]]:
    """Every route that takes an id, with a harmless but valid body where one is needed."""
    tenant, user, device = objects["tenant"], objects["user"], objects["device"]
    return [
        ("GET", f"/api/tenants/{tenant}", None),
        ("PATCH", f"/api/tenants/{tenant}", {"name": "renamed", "retention_days": 1}),
        ("DELETE", f"/api/tenants/{tenant}", None),
        ("GET", f"/api/users/{user}", None),
        ("PATCH", f"/api/users/{user}", {"password": "hijacked-password"}),
        ("PATCH", f"/api/users/{user}", {"role": "tenant_admin"}),
        ("DELETE", f"/api/users/{user}", None),
        ("GET", f"/api/devices/{device}", None),
        ("PATCH", f"/api/devices/{device}", {"name": "stolen", "status": "disabled"}),
        ("DELETE", f"/api/devices/{device}", None),
        ("POST", f"/api/devices/{device}/token", None),
        ("POST", f"/api/devices/{device}/commands", {"method": "open"}),
        ("GET", f"/api/devices/{device}/telemetry", None),
        ("GET", f"/api/devices/{device}/telemetry?agg=sum&interval=1h&start=0&end=3600000", None),
        ("GET", f"/api/devices/{device}/telemetry/latest", None),
    ]


async def _snapshot(api: Api, world: dict[str, Any], name: str) -> dict[str, Any]:
    """Tenant `name`'s objects as the sysadmin sees them."""
    side = world[name]
    return {
        "tenant": await api.ok("GET", f"/api/tenants/{side['tenant']['id']}", headers=api.admin),
        "admin": await api.ok("GET", f"/api/users/{side['admin']['id']}", headers=api.admin),
        "user": await api.ok("GET", f"/api/users/{side['user']['id']}", headers=api.admin),
        "device": await api.ok("GET", f"/api/devices/{side['device']['id']}", headers=api.admin),
        "latest": await api.ok(
            "GET", f"/api/devices/{side['device']['id']}/telemetry/latest", headers=api.admin
        ),
    }


async def test_cross_tenant_matrix(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        world = await _world(api)
        before = await _snapshot(api, world, "b")
        foreign = {
            "tenant": world["b"]["tenant"]["id"],
            "user": world["b"]["user"]["id"],
            "device": world["b"]["device"]["id"],
        }
        missing = {key: str(uuid.uuid4()) for key in foreign}
        checked = 0
        for role in ("tenant_admin", "tenant_user"):
            headers = world["a"][role]
            for (method, url, body), (_, missing_url, _) in zip(
                _id_routes(foreign), _id_routes(missing), strict=True
            ):
                answer = await api.client.request(method, url, json=body, headers=headers)
                absent = await api.client.request(method, missing_url, json=body, headers=headers)
                # Indistinguishable from a missing object, and never a success.
                assert answer.status_code == absent.status_code, (role, method, url, answer.text)
                assert answer.status_code in (403, 404), (role, method, url, answer.text)
                if method == "GET" or (role == "tenant_admin" and "/tenants/" not in url):
                    assert answer.status_code == 404, (role, method, url, answer.text)
                assert set(answer.json()) == {"detail"}
                checked += 1
        assert checked == 2 * len(_id_routes(foreign))

        # Lists show only the caller's own tenant.
        for role in ("tenant_admin", "tenant_user"):
            headers = world["a"][role]
            tenant_id = world["a"]["tenant"]["id"]
            for url in ("/api/devices", "/api/users", "/api/tenants"):
                page = await api.ok("GET", url, headers=headers)
                assert page["total"] == len(page["items"]) >= 1
                for item in page["items"]:
                    assert item.get("tenant_id", item.get("id")) == tenant_id, (url, item)

        # Nothing of tenant B changed; its device token still works.
        assert await _snapshot(api, world, "b") == before
        answer = await api.client.post(
            f"/api/v1/{world['b']['device']['token']}/telemetry", json={"v": 2}
        )
        assert answer.status_code == 200
        await api.login("b-user", PASSWORD)  # the password was not changed


async def test_mass_assignment_is_never_persisted(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        world = await _world(api)
        a, b = world["a"], world["b"]
        admin_a = a["tenant_admin"]

        # tenant_id of another tenant is ignored on create: the object lands in the caller's.
        device = await api.device(admin_a, "moved?", tenant_id=b["tenant"]["id"])
        assert device["tenant_id"] == a["tenant"]["id"]
        user = await api.ok(
            "POST",
            "/api/users",
            201,
            json={
                "username": "sneaky",
                "password": PASSWORD,
                "role": "tenant_user",
                "tenant_id": b["tenant"]["id"],
            },
            headers=admin_a,
        )
        assert user["tenant_id"] == a["tenant"]["id"]

        # A tenant admin cannot make a sysadmin, by create or by update.
        answer = await api.client.post(
            "/api/users",
            json={"username": "root2", "password": PASSWORD, "role": "sysadmin"},
            headers=admin_a,
        )
        assert answer.status_code == 403
        answer = await api.client.patch(
            f"/api/users/{a['user']['id']}", json={"role": "sysadmin"}, headers=admin_a
        )
        assert answer.status_code == 403
        # Nor change tenants or retention.
        answer = await api.client.patch(
            f"/api/tenants/{a['tenant']['id']}", json={"retention_days": 1}, headers=admin_a
        )
        assert answer.status_code == 403
        answer = await api.client.post("/api/tenants", json={"name": "mine"}, headers=admin_a)
        assert answer.status_code == 403

        # Fields a route does not take are refused (400) and nothing is stored.
        device_id = a["device"]["id"]
        attempts: list[tuple[str, str, dict[str, Any]]] = [
            ("PATCH", f"/api/devices/{device_id}", {"tenant_id": b["tenant"]["id"]}),
            ("PATCH", f"/api/devices/{device_id}", {"id": str(uuid.uuid4()), "name": "x"}),
            ("PATCH", f"/api/devices/{device_id}", {"token": "chosen-token-123456"}),
            ("PATCH", f"/api/devices/{device_id}", {"token_hash": "0" * 64}),
            ("PATCH", f"/api/users/{a['user']['id']}", {"tenant_id": b["tenant"]["id"]}),
            ("PATCH", f"/api/users/{a['user']['id']}", {"username": "renamed"}),
            ("PATCH", f"/api/users/{a['user']['id']}", {"password_hash": "$2b$04$x"}),
            ("POST", "/api/devices", {"name": "n", "id": str(uuid.uuid4())}),
            ("POST", "/api/devices", {"name": "n", "status": "disabled", "token": "t" * 32}),
            ("POST", "/api/users", {"username": "u2", "password": PASSWORD, "id": "x"}),
            ("PATCH", f"/api/tenants/{a['tenant']['id']}", {"id": str(uuid.uuid4())}),
        ]
        before = await _snapshot(api, world, "a")
        for method, url, body in attempts:
            for headers in (admin_a, api.admin):
                answer = await api.client.request(method, url, json=body, headers=headers)
                assert answer.status_code in (400, 403), (method, url, body, answer.text)
                if headers is api.admin or "/tenants/" not in url:
                    assert answer.status_code == 400, (method, url, body, answer.text)
                    assert "not a field you can set" in answer.json()["detail"]
        assert await _snapshot(api, world, "a") == before
        names = {d["name"] for d in (await api.ok("GET", "/api/devices", headers=admin_a))["items"]}
        assert "n" not in names

        # A sysadmin naming a tenant that does not exist gets 404, and a sysadmin must name one.
        answer = await api.client.post(
            "/api/devices", json={"name": "d", "tenant_id": str(uuid.uuid4())}, headers=api.admin
        )
        assert answer.status_code == 404
        answer = await api.client.post("/api/devices", json={"name": "d"}, headers=api.admin)
        assert answer.status_code == 400 and "tenant_id" in answer.json()["detail"]
        # Roles cannot cross between sysadmin and tenant, and nobody deletes themselves.
        answer = await api.client.patch(
            f"/api/users/{a['user']['id']}", json={"role": "sysadmin"}, headers=api.admin
        )
        assert answer.status_code == 400
        me = await api.ok("GET", "/api/auth/me", headers=admin_a)
        answer = await api.client.delete(f"/api/users/{me['id']}", headers=admin_a)
        assert answer.status_code == 400


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def test_bad_access_tokens_are_refused(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        world = await _world(api)
        token = world["a"]["tenant_user"]["Authorization"].split()[1]
        header, payload, signature = token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
        now = int(time.time())
        forged_admin = {**claims, "role": "sysadmin", "tid": None}
        wrong_key = jwt.encode(claims, b"k" * 32, algorithm="HS256")
        expired = jwt.encode(
            {**claims, "iat": now - 7200, "exp": now - 3600},
            (tmp_path / "jwt-secret").read_text().strip().encode(),
            algorithm="HS256",
        )
        bad = {
            "none": {},
            "not bearer": {"Authorization": f"Basic {token}"},
            "garbage": bearer("garbage"),
            "alg none": bearer(f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(forged_admin)}."),
            "tampered": bearer(f"{header}.{_b64(forged_admin)}.{signature}"),
            "wrong key": bearer(wrong_key),
            "expired": bearer(expired),
        }
        for label, headers in bad.items():
            answer = await api.client.get("/api/devices", headers=headers)
            assert answer.status_code == 401, (label, answer.text)
            assert answer.headers["www-authenticate"] == "Bearer"
            assert answer.json()["detail"], label
        assert "expired" in (await api.client.get("/api/users", headers=bad["expired"])).text

        # A deleted user's token stops working at once; a role change ends the tokens
        # issued before it (the user logs in again and gets the new role's rights).
        user_id = world["a"]["user"]["id"]
        await api.ok("DELETE", f"/api/users/{user_id}", 204, headers=api.admin)
        answer = await api.client.get("/api/devices", headers=world["a"]["tenant_user"])
        assert answer.status_code == 401
        admin_id = world["a"]["admin"]["id"]
        await api.ok(
            "PATCH", f"/api/users/{admin_id}", json={"role": "tenant_user"}, headers=api.admin
        )
        answer = await api.client.post(
            "/api/devices", json={"name": "late"}, headers=world["a"]["tenant_admin"]
        )
        assert answer.status_code == 401 and "log in again" in answer.text
        relogged = await api.login("a-admin", PASSWORD)
        answer = await api.client.post("/api/devices", json={"name": "late"}, headers=relogged)
        assert answer.status_code == 403


async def test_login_is_rate_limited(tmp_path: Path) -> None:
    async with api_platform(tmp_path, IIOT_LOGIN_ATTEMPTS_PER_MINUTE="3") as api:
        for _ in range(3):
            answer = await api.client.post(
                "/api/auth/login", json={"username": "admin", "password": "wrong-password"}
            )
            assert answer.status_code == 401
            assert answer.json() == {"detail": "wrong username or password"}
        unknown = await api.client.post(
            "/api/auth/login", json={"username": "nobody", "password": "wrong-password"}
        )
        assert unknown.status_code == 429  # the address is throttled too
        answer = await api.client.post(
            "/api/auth/login", json={"username": "admin", "password": "admin-password-for-tests"}
        )
        assert answer.status_code == 429
        assert 1 <= int(answer.headers["retry-after"]) <= 60
        assert "too many failed logins" in answer.json()["detail"]
        # Tokens already issued keep working.
        assert (await api.client.get("/api/devices", headers=api.admin)).status_code == 200


async def test_login_errors_are_clear(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        cases: list[tuple[Any, int]] = [
            ({"username": "admin"}, 400),
            ({"username": "admin", "password": 5}, 400),
            ({"username": "", "password": "x"}, 400),
            ({"username": "nobody", "password": "whatever-123"}, 401),
            ([], 400),
        ]
        for body, status in cases:
            answer = await api.client.post("/api/auth/login", json=body)
            assert answer.status_code == status, (body, answer.text)
            assert isinstance(answer.json()["detail"], str)
        broken = await api.client.post(
            "/api/auth/login",
            content=b'{"username": ',
            headers={"content-type": "application/json"},
        )
        assert broken.status_code == 400 and "JSON" in broken.json()["detail"]


async def test_management_body_limit(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        tenant = await api.tenant("t")
        device = await api.device(api.admin, "d", tenant_id=tenant["id"])
        huge = {"method": "x", "params": "y" * (2 * 1024 * 1024)}
        answer = await api.client.post(
            f"/api/devices/{device['id']}/commands", json=huge, headers=api.admin
        )
        assert answer.status_code == 413, answer.text
        assert answer.json()["detail"]

        async def chunks() -> Any:
            for _ in range(40):
                yield b"x" * 65536

        answer = await api.client.post(
            "/api/tenants",
            content=chunks(),
            headers={**api.admin, "content-type": "application/json"},
        )
        assert answer.status_code == 413, answer.text


async def test_commands_to_a_device_that_is_not_connected(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        tenant = await api.tenant("t")
        device = await api.device(api.admin, "d", tenant_id=tenant["id"])
        url = f"/api/devices/{device['id']}/commands"
        answer = await api.client.post(url, json={"method": "setValve"}, headers=api.admin)
        assert answer.status_code == 504
        assert answer.json()["status"] == "FAILED"
        assert "not connected" in answer.json()["error"]
        for body in ([1, 2], "text", 5):
            answer = await api.client.post(url, json=body, headers=api.admin)
            assert answer.status_code == 400, answer.text


async def test_unknown_routes_and_methods_answer_json(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        client: httpx.AsyncClient = api.client
        answer = await client.get("/api/nothing", headers=api.admin)
        assert answer.status_code == 404 and answer.json()["detail"]
        answer = await client.put("/api/devices", headers=api.admin)
        assert answer.status_code == 405 and answer.json()["detail"]
        answer = await client.get("/api/devices/not-a-uuid", headers=api.admin)
        assert answer.status_code == 400 and "device_id" in answer.json()["detail"]
        answer = await client.get("/api/devices?limit=100000", headers=api.admin)
        assert answer.status_code == 400 and "limit" in answer.json()["detail"]
