"""OPC UA `SendCommand` end to end: an asyncua client commands a device that long-polls
over HTTP and gets its answer; attributes appear as read-only properties."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua

from tests.e2e.api_helpers import Api, api_platform
from tests.e2e.test_opcua_server import (
    device_node,
    eventually,
    make_client_cert,
    opcua_client,
    trust,
)
from tests.support import free_port


async def _device_answers(api: Api, token: str, answer: Any) -> dict[str, Any]:
    poll = await api.client.get(f"/api/v1/{token}/rpc", params={"timeout": 10_000})
    assert poll.status_code == 200, poll.text
    command: dict[str, Any] = poll.json()
    await api.ok("POST", f"/api/v1/{token}/rpc/{command['id']}", json=answer)
    return command


async def test_send_command_and_attributes_over_opcua(tmp_path: Path, pg_url: str) -> None:
    port = free_port()
    cert = make_client_cert(tmp_path / "client-pki")
    data_dir = tmp_path / "platform"
    async with api_platform(data_dir, IIOT_OPCUA_PORT=str(port), IIOT_DATABASE_URL=pg_url) as api:
        trust(data_dir, cert)
        tenant = await api.tenant("acme")
        await api.user("acme-admin", "tenant_admin", tenant["id"])
        await api.user("acme-viewer", "tenant_user", tenant["id"])
        device = await api.device(api.admin, "pump", tenant_id=tenant["id"])
        token = device["token"]
        async with opcua_client(port, cert, "acme-admin", "password-123") as client:
            ns, node = await device_node(client, "acme", "pump")
            method = await node.get_child(f"{ns}:SendCommand")
            device_side = asyncio.create_task(_device_answers(api, token, {"rpm": 900}))
            await asyncio.sleep(0.3)
            status, response = await node.call_method(
                method,
                ua.Variant("getRpm", ua.VariantType.String),
                ua.Variant('{"unit": "rpm"}', ua.VariantType.String),
            )
            assert status == "SUCCESSFUL" and json.loads(response) == {"rpm": 900}
            received = await device_side
            assert received["method"] == "getRpm" and received["params"] == {"unit": "rpm"}
            page = await api.ok("GET", f"/api/devices/{device['id']}/commands", headers=api.admin)
            assert page["items"][0]["sent_by"] is not None

            # Nobody listening: the call answers with the state, as REST's 504 does.
            status, response = await node.call_method(
                method,
                ua.Variant("ping", ua.VariantType.String),
                ua.Variant("", ua.VariantType.String),
            )
            assert status == "FAILED" and response == ""
            with pytest.raises(ua.uaerrors.BadInvalidArgument):
                await node.call_method(
                    method,
                    ua.Variant("x", ua.VariantType.String),
                    ua.Variant("{not json", ua.VariantType.String),
                )

            # Attributes: shared set over REST and client reported by the device.
            await api.ok(
                "PUT",
                f"/api/devices/{device['id']}/attributes/shared",
                204,
                json={"interval": 30},
                headers=api.admin,
            )
            await api.ok("POST", f"/api/v1/{token}/attributes", json={"fw": "1.2"})

            async def attribute(name: str) -> Any:
                try:
                    child = await node.get_child(f"{ns}:{name}")
                except ua.UaStatusCodeError:
                    return None
                return await child.read_value()

            assert await eventually(lambda: attribute("shared:interval")) == "30"
            assert await eventually(lambda: attribute("client:fw")) == '"1.2"'

        async with opcua_client(port, cert, "acme-viewer", "password-123") as client:
            ns, node = await device_node(client, "acme", "pump")
            method = await node.get_child(f"{ns}:SendCommand")
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                await node.call_method(
                    method,
                    ua.Variant("x", ua.VariantType.String),
                    ua.Variant("", ua.VariantType.String),
                )
