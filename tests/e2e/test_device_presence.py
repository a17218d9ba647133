"""Device type, gateway link, presence (last_seen, connected, active) and certificates over REST."""

from __future__ import annotations

import asyncio
import datetime
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from iiot.bus import RecordEvent
from iiot.links import OutboundCommand
from iiot.model import Device
from tests.e2e.api_helpers import Api, api_platform


class _Link:
    """A device listening in this process, as an adapter would attach it."""

    protocol = "test"
    listens_commands = True
    listens_attributes = False

    async def deliver_command(self, command: OutboundCommand) -> bool:
        return True

    async def deliver_attributes(self, shared: Mapping[str, Any], deleted: Sequence[str]) -> None:
        return None


async def _until(api: Api, url: str, check: Any, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        answer: dict[str, Any] = await api.ok("GET", url, headers=api.admin)
        if check(answer) or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.1)


def _certificate_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "press-1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(Encoding.PEM).decode()


async def test_new_fields_filters_and_presence(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        tenant = await api.tenant("acme")
        made = await api.device(api.admin, "gw-1", tenant_id=tenant["id"], type="gateway")
        assert made["type"] == "gateway" and made["token"]
        assert (made["connected"], made["last_seen"], made["active"]) == (False, None, False)
        press = await api.device(api.admin, "press-1", tenant_id=tenant["id"])
        assert press["type"] == "default" and press["gateway_id"] is None

        bad = await api.client.post(
            "/api/devices",
            json={"name": "x", "tenant_id": tenant["id"], "type": "no spaces"},
            headers=api.admin,
        )
        assert bad.status_code == 400 and "type" in bad.text

        # A message makes the device seen (written within about a second), so active.
        answer = await api.client.post(f"/api/v1/{press['token']}/telemetry", json={"t": 1})
        assert answer.status_code == 200
        url = f"/api/devices/{press['id']}"
        seen = await _until(api, url, lambda d: d["last_seen"] is not None)
        assert seen["active"] is True
        assert abs(seen["last_seen"] - time.time() * 1000) < 60_000

        # A link attached by an adapter makes it connected, live and in REST.
        services = api.platform.services
        events = services.bus.subscribe()
        device: Device = await services.store.get_device(None, uuid.UUID(press["id"]))
        link = _Link()
        services.links.attach(device, link)
        assert (await _until(api, url, lambda d: d["connected"]))["connected"] is True
        services.links.detach(device.id, link)
        assert (await _until(api, url, lambda d: not d["connected"]))["connected"] is False
        kinds = []
        while not events.empty():
            event = events.get_nowait()
            if isinstance(event, RecordEvent) and event.topic == "connectivity":
                assert event.device_id == device.id and event.tenant_id == device.tenant_id
                kinds.append(event.kind)
        assert kinds == ["connected", "disconnected"]

        async def names(**params: Any) -> list[str]:
            page = await api.ok("GET", "/api/devices", headers=api.admin, params=params)
            return [d["name"] for d in page["items"]]

        assert await names(type="gateway") == ["gw-1"]
        assert await names(active="true") == ["press-1"]
        assert await names(active="false") == ["gw-1"]
        assert await names(search="PRESS") == ["press-1"]
        assert await names(connected="true") == []
        changed = await api.ok("PATCH", url, headers=api.admin, json={"type": "hydraulic-press"})
        assert changed["type"] == "hydraulic-press" and changed["name"] == "press-1"


async def test_client_certificates_are_registered_by_fingerprint(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        tenant = await api.tenant("acme")
        press = await api.device(api.admin, "press-1", tenant_id=tenant["id"])
        url = f"/api/devices/{press['id']}/certificate"
        pem = _certificate_pem()
        answer = await api.ok("POST", url, headers=api.admin, json={"pem": pem})
        assert len(answer["fingerprint"]) == 64
        services = api.platform.services
        der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(Encoding.DER)
        device = await services.identity.authenticate_certificate(der)
        assert str(device.id) == press["id"]
        refused = await api.client.post(url, headers=api.admin, json={"pem": "not a cert"})
        assert refused.status_code == 400 and "certificate" in refused.json()["detail"]
        other = await api.device(api.admin, "press-2", tenant_id=tenant["id"])
        taken = await api.client.post(
            f"/api/devices/{other['id']}/certificate", headers=api.admin, json={"pem": pem}
        )
        assert taken.status_code == 409
        await api.ok("DELETE", url, 204, headers=api.admin)
        assert await services.store.find_device_by_certificate(answer["fingerprint"]) is None
