"""OPC UA hardening (item 9): logins are throttled per username and address, a deleted or
demoted user loses their session's rights at once, an anonymous session (only with
IIOT_OPCUA_ALLOW_NONE=1) sees no tenant, and the rejected-certificate folder is bounded."""

from __future__ import annotations

from pathlib import Path

import pytest
from asyncua import ua

from iiot.adapters import opcua_pki
from tests.e2e.api_helpers import ADMIN_PASSWORD, Api, api_platform
from tests.e2e.test_opcua_server import NS_URI, device_node, make_client_cert, opcua_client, trust
from tests.support import free_port


async def _tenant_with_device(api: Api) -> dict[str, object]:
    tenant = await api.tenant("acme")
    device = await api.device(api.admin, "pump", tenant_id=tenant["id"])
    return {"tenant": tenant, "device": device}


async def test_anonymous_session_sees_no_tenant(tmp_path: Path) -> None:
    port = free_port()
    async with api_platform(
        tmp_path / "data", IIOT_OPCUA_PORT=str(port), IIOT_OPCUA_ALLOW_NONE="1"
    ) as api:
        await _tenant_with_device(api)
        async with opcua_client(port, None, "admin", ADMIN_PASSWORD) as admin:
            ns = await admin.get_namespace_index(NS_URI)
            tenants = await admin.nodes.objects.get_child([f"{ns}:Tenants"])
            assert len(await tenants.get_children()) == 1
        async with opcua_client(port, None, None, None) as anonymous:
            tenants = await anonymous.nodes.objects.get_child([f"{ns}:Tenants"])
            assert await tenants.get_children() == []


async def test_demoted_then_deleted_user_loses_the_sessions_rights(tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    cert = make_client_cert(tmp_path / "client")
    async with api_platform(data_dir, IIOT_OPCUA_PORT=str(port)) as api:
        world = await _tenant_with_device(api)
        tenant = world["tenant"]
        assert isinstance(tenant, dict)
        user, _ = await api.user("ops", "tenant_admin", tenant["id"])
        trust(data_dir, cert)
        async with opcua_client(port, cert, "ops", "password-123") as client:
            ns, node = await device_node(client, "acme", "pump")
            set_status = await node.get_child(f"{ns}:SetStatus")
            await node.call_method(set_status, "maintenance")
            await api.ok(
                "PATCH",
                f"/api/users/{user['id']}",
                json={"role": "tenant_user"},
                headers=api.admin,
            )
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                await node.call_method(set_status, "active")
            status = await node.get_child(f"{ns}:Status")
            assert await status.read_value() == "maintenance"  # still readable: tenant_user
            await api.ok("DELETE", f"/api/users/{user['id']}", 204, headers=api.admin)
            with pytest.raises(ua.UaStatusCodeError):
                await status.read_value()


async def test_logins_are_throttled_per_username_and_address(tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    cert = make_client_cert(tmp_path / "client")
    async with api_platform(
        data_dir, IIOT_OPCUA_PORT=str(port), IIOT_LOGIN_ATTEMPTS_PER_MINUTE="3"
    ) as api:
        await api.user("ops", "sysadmin", None)
        trust(data_dir, cert)
        for _ in range(4):
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                async with opcua_client(port, cert, "ops", "wrong-password"):
                    pass
        # Throttled now: even the right password is refused without being checked...
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            async with opcua_client(port, cert, "ops", "password-123"):
                pass
        assert api.platform.services.metrics.auth_failures.labels("opcua")._value.get() >= 5
        # Per (username, address) with backoff, plus a per-address limit: one username's
        # failures elsewhere never lock it out here (tests/unit/test_security.py).


async def test_rejected_certificate_folder_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(opcua_pki, "MAX_REJECTED", 3)
    port = free_port()
    data_dir = tmp_path / "data"
    async with api_platform(data_dir, IIOT_OPCUA_PORT=str(port)):
        for i in range(6):
            cert = make_client_cert(tmp_path / f"client{i}", f"client{i}")
            with pytest.raises((ua.UaError, OSError, TimeoutError)):
                async with opcua_client(port, cert, "admin", ADMIN_PASSWORD):
                    pass
        rejected = sorted(p.name for p in (data_dir / "pki" / "rejected").iterdir())
        assert len(rejected) == 3
        assert all("client" in name for name in rejected)
