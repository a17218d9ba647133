"""The CoAP device API, driven with aiocoap's client and libcoap's `coap-client`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiocoap
import asyncpg
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.util.linkformat import parse as parse_links

from iiot.app import Platform
from iiot.model import Device
from tests.support import free_port, platform_env, running_platform, services_required

TS = 1_767_225_600_000


@dataclass
class Coap:
    """A running platform with CoAP on, one device, and a client context."""

    platform: Platform
    port: int
    device: Device
    token: str
    client: aiocoap.Context

    def uri(self, path: str) -> str:
        return f"coap://127.0.0.1:{self.port}{path}"

    async def request(
        self, code: Code, path: str, payload: bytes = b"", **opts: object
    ) -> aiocoap.Message:
        message = aiocoap.Message(code=code, uri=self.uri(path), payload=payload, **opts)
        return await asyncio.wait_for(self.client.request(message).response, 30)

    async def post(self, payload: bytes, **opts: object) -> aiocoap.Message:
        return await self.request(Code.POST, f"/api/v1/{self.token}/telemetry", payload, **opts)

    async def latest(self) -> dict[str, tuple[int, object]]:
        points = await self.platform.services.store.latest(None, self.device.id)
        return {key: (point.ts, point.value) for key, point in points.items()}


async def _coap(env: dict[str, str]) -> AsyncIterator[Coap]:
    port = free_port(socket.SOCK_DGRAM)
    async with running_platform({**env, "IIOT_COAP_PORT": str(port)}) as platform:
        services = platform.services
        tenant = await services.store.create_tenant("plant")
        device, token = await services.registry.create_device(tenant.id, "press-1")
        client = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            yield Coap(platform, port, device, token, client)
        finally:
            await client.shutdown()


@pytest.fixture
async def coap(tmp_path: Path) -> AsyncIterator[Coap]:
    async for running in _coap(platform_env(tmp_path, IIOT_MAX_MESSAGE_BYTES="65536")):
        yield running


def coap_client() -> str:
    """libcoap's client binary (Debian package libcoap3-bin)."""
    for name in ("coap-client", "coap-client-notls", "coap-client-openssl", "coap-client-gnutls"):
        path = shutil.which(name)
        if path:
            return path
    message = "libcoap's coap-client is not installed (Debian package libcoap3-bin)"
    if services_required():
        pytest.fail(message)
    pytest.skip(message)


async def run_coap_client(*args: str) -> tuple[str, str]:
    """Run `coap-client`; returns (stdout, stderr), where libcoap prints error codes."""
    result = await asyncio.to_thread(
        subprocess.run,
        [coap_client(), "-B", "10", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.stdout.strip(), result.stderr.strip()


# --- aiocoap client --------------------------------------------------------------------


async def test_post_json_is_stored_and_answered_changed(coap: Coap) -> None:
    response = await coap.post(
        json.dumps({"ts": TS, "values": {"temp": 21.5, "on": True}}).encode(), content_format=50
    )
    assert response.code == Code.CHANGED
    assert await coap.latest() == {"temp": (TS, 21.5), "on": (TS, True)}


async def test_empty_object_is_an_empty_message(coap: Coap) -> None:
    response = await coap.post(b"{}", content_format=50)
    assert response.code == Code.CHANGED
    assert await coap.latest() == {}


async def test_post_without_content_format_is_json(coap: Coap) -> None:
    response = await coap.post(b'[{"ts": 1767225600000, "values": {"rpm": 900}}]')
    assert response.code == Code.CHANGED
    assert await coap.latest() == {"rpm": (TS, 900)}


async def test_post_senml_is_stored(coap: Coap) -> None:
    pack = [
        {"bn": "press-1/", "bt": TS / 1000, "n": "temp", "u": "Cel", "v": 21.5},
        {"n": "temp", "t": 1, "v": 22.0},
        {"n": "door", "vb": False},
    ]
    response = await coap.post(json.dumps(pack).encode(), content_format=110)
    assert response.code == Code.CHANGED
    assert await coap.latest() == {"press-1/temp": (TS + 1000, 22.0), "press-1/door": (TS, False)}


async def test_get_device_returns_own_id_name_and_status(coap: Coap) -> None:
    response = await coap.request(Code.GET, f"/api/v1/{coap.token}/device")
    assert response.code == Code.CONTENT
    assert response.opt.content_format == 50
    assert json.loads(response.payload) == {
        "id": str(coap.device.id),
        "name": "press-1",
        "status": "active",
    }


async def test_well_known_core_lists_resource_types_and_formats(coap: Coap) -> None:
    response = await coap.request(Code.GET, "/.well-known/core")
    assert response.code == Code.CONTENT
    assert response.opt.content_format == 40
    links = {link.href: link for link in parse_links(response.payload.decode()).links}
    telemetry = links["/api/v1/%7Btoken%7D/telemetry"]
    assert telemetry.rt == ["iiot.telemetry"]
    assert telemetry.ct == ["50 110"]
    assert links["/api/v1/%7Btoken%7D/device"].rt == ["iiot.device"]
    filtered = await coap.request(Code.GET, "/.well-known/core?rt=iiot.device")
    assert [link.href for link in parse_links(filtered.payload.decode()).links] == [
        "/api/v1/%7Btoken%7D/device"
    ]


@pytest.mark.parametrize(
    ("payload", "code", "diagnostic"),
    [
        (b'{"temp": ', Code.BAD_REQUEST, "invalid JSON at line 1"),
        (b'{"ts": "yesterday", "values": {"a": 1}}', Code.BAD_REQUEST, "ts must be an integer"),
        (b"[]", Code.BAD_REQUEST, "empty array"),
    ],
)
async def test_invalid_payload_is_refused_with_diagnostic(
    coap: Coap, payload: bytes, code: Code, diagnostic: str
) -> None:
    response = await coap.post(payload)
    assert response.code == code
    assert diagnostic in response.payload.decode()
    assert await coap.latest() == {}


async def test_invalid_senml_is_refused_with_diagnostic(coap: Coap) -> None:
    response = await coap.post(b'[{"n": "a", "v": "warm"}]', content_format=110)
    assert response.code == Code.BAD_REQUEST
    assert response.payload.decode() == "record [0]: v must be a number"


async def test_unknown_token_is_unauthorized(coap: Coap) -> None:
    response = await coap.request(Code.POST, "/api/v1/not-a-token/telemetry", b'{"a": 1}')
    assert response.code == Code.UNAUTHORIZED
    assert response.payload == b"unknown device token"
    response = await coap.request(Code.GET, "/api/v1/not-a-token/device")
    assert response.code == Code.UNAUTHORIZED


async def test_disabled_device_is_forbidden(coap: Coap) -> None:
    await coap.platform.services.registry.update_device(None, coap.device.id, status="disabled")
    response = await coap.post(b'{"a": 1}')
    assert response.code == Code.FORBIDDEN
    assert "disabled" in response.payload.decode()
    device = await coap.request(Code.GET, f"/api/v1/{coap.token}/device")
    assert json.loads(device.payload)["status"] == "disabled"
    assert await coap.latest() == {}


async def test_unsupported_content_format_is_refused(coap: Coap) -> None:
    response = await coap.post(b'{"a": 1}', content_format=0)
    assert response.code == Code.UNSUPPORTED_CONTENT_FORMAT
    assert "use 50" in response.payload.decode()


async def test_unknown_path_and_wrong_method(coap: Coap) -> None:
    assert (await coap.request(Code.GET, "/nothing/here")).code == Code.NOT_FOUND
    assert (await coap.request(Code.GET, f"/api/v1/{coap.token}/other")).code == Code.NOT_FOUND
    assert (await coap.request(Code.GET, "/api/v1")).code == Code.NOT_FOUND
    wrong = await coap.request(Code.GET, f"/api/v1/{coap.token}/telemetry")
    assert wrong.code == Code.METHOD_NOT_ALLOWED
    wrong = await coap.request(Code.PUT, f"/api/v1/{coap.token}/device", b"{}")
    assert wrong.code == Code.METHOD_NOT_ALLOWED


async def test_blockwise_post_is_reassembled_and_stored(coap: Coap) -> None:
    items = [{"ts": TS + i, "values": {"seq": i, "label": f"item-{i:05d}"}} for i in range(600)]
    payload = json.dumps(items).encode()
    assert len(payload) > 20_000  # many 1024-byte blocks
    response = await coap.post(payload, content_format=50)
    assert response.code == Code.CHANGED
    stored = await coap.latest()
    assert stored["seq"] == (TS + 599, 599)


async def test_blockwise_post_over_the_limit_is_refused_early(coap: Coap) -> None:
    payload = json.dumps([{"ts": TS + i, "values": {"v": "x" * 100}} for i in range(1000)]).encode()
    assert len(payload) > 65_536
    response = await coap.post(payload)
    assert response.code == Code.REQUEST_ENTITY_TOO_LARGE
    assert response.opt.size1 == 65_536
    assert await coap.latest() == {}


async def test_single_datagram_over_the_limit_is_too_large(tmp_path: Path) -> None:
    env = platform_env(tmp_path, IIOT_MAX_MESSAGE_BYTES="256")
    async for coap in _coap(env):
        response = await coap.post(json.dumps({"text": "x" * 400}).encode())
        assert response.code == Code.REQUEST_ENTITY_TOO_LARGE
        assert response.opt.size1 == 256
        assert "limit is 256 bytes" in response.payload.decode()


async def test_malformed_datagrams_do_not_stop_the_server(coap: Coap) -> None:
    garbage = [
        b"",
        b"\x00",
        b"\xff\xff\xff\xff\xff",
        b"\x40\x01\x12\x34\xff",  # CON GET, payload marker without payload
        b"\x48\x02\x12\x35abc",  # token length 8 but only 3 bytes
        b"\x40\x02\x12\x36\xdd\xff\xff",  # option with a reserved extended length
        b"\x80\x02\x12\x37",  # CoAP version 2
        os.urandom(1500),
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in garbage:
            sock.sendto(datagram, ("127.0.0.1", coap.port))
    response = await coap.post(b'{"ts": 1767225600000, "values": {"alive": true}}')
    assert response.code == Code.CHANGED
    assert await coap.latest() == {"alive": (TS, True)}


async def test_storage_unavailable_is_503_with_max_age(tmp_path: Path, pg_url: str) -> None:
    env = platform_env(tmp_path, IIOT_DATABASE_URL=pg_url, IIOT_COMMIT_TIMEOUT_S="1")
    async for coap in _coap(env):
        blocker = await asyncpg.connect(pg_url)
        try:
            transaction = blocker.transaction()
            await transaction.start()
            # A database that does not answer: every telemetry write waits for this lock.
            await blocker.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")
            response = await coap.post(b'{"ts": 1767225600000, "values": {"a": 1}}')
            assert response.code == Code.SERVICE_UNAVAILABLE
            assert response.opt.max_age == 5
            assert "storage unavailable" in response.payload.decode()
            await transaction.rollback()
        finally:
            await blocker.close()


# --- libcoap's coap-client -------------------------------------------------------------


async def test_coap_client_posts_json_and_senml(coap: Coap) -> None:
    uri = coap.uri(f"/api/v1/{coap.token}/telemetry")
    out, err = await run_coap_client(
        "-m", "post", "-t", "50", "-e", '{"ts": 1767225600000, "values": {"a": 1}}', uri
    )
    assert (out, err) == ("", "")
    out, err = await run_coap_client(
        "-m", "post", "-t", "110", "-e", '[{"n": "b", "vs": "ok", "bt": 1767225600}]', uri
    )
    assert (out, err) == ("", "")
    assert await coap.latest() == {"a": (TS, 1), "b": (TS, "ok")}


async def test_coap_client_sees_errors_device_and_discovery(coap: Coap) -> None:
    _, err = await run_coap_client(
        "-m", "post", "-e", "{oops", coap.uri(f"/api/v1/{coap.token}/telemetry")
    )
    assert err.startswith("4.00 invalid JSON")
    _, err = await run_coap_client(
        "-m", "post", "-e", '{"a": 1}', coap.uri("/api/v1/nope/telemetry")
    )
    assert err == "4.01 unknown device token"
    out, _ = await run_coap_client("-m", "get", coap.uri(f"/api/v1/{coap.token}/device"))
    assert json.loads(out)["id"] == str(coap.device.id)
    out, _ = await run_coap_client("-m", "get", coap.uri("/.well-known/core"))
    assert 'rt="iiot.telemetry"' in out and 'ct="50 110"' in out


async def test_coap_client_blockwise_post(coap: Coap, tmp_path: Path) -> None:
    items = [{"ts": TS + i, "values": {"seq": i}} for i in range(200)]
    body = tmp_path / "body.json"
    body.write_text(json.dumps(items))
    _, err = await run_coap_client(
        "-m",
        "post",
        "-t",
        "50",
        "-b",
        "64",
        "-f",
        str(body),
        coap.uri(f"/api/v1/{coap.token}/telemetry"),
    )
    assert err == ""
    assert (await coap.latest())["seq"] == (TS + 199, 199)
