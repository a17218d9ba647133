"""The HTTP device API over real HTTP: every bad input gets the contract's status and a
message and leaves stored data unchanged; storage outages answer 503 with Retry-After."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tests.e2e.api_helpers import Api, api_platform
from tests.support import free_port

SENML = "application/senml+json"


async def _device(api: Api, name: str = "sensor") -> dict[str, Any]:
    tenant = await api.tenant(f"tenant-of-{name}")
    return await api.device(api.admin, name, tenant_id=tenant["id"])


async def _stored(api: Api, device: dict[str, Any]) -> Any:
    """Everything the device has stored (raw points of every key)."""
    return await api.ok(
        "GET", f"/api/devices/{device['id']}/telemetry", headers=api.admin, params={"limit": 10000}
    )


def _metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_bad_input_matrix(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        device = await _device(api)
        disabled = await _device(api, "old")
        await api.ok(
            "PATCH",
            f"/api/devices/{disabled['id']}",
            json={"status": "disabled"},
            headers=api.admin,
        )
        url = f"/api/v1/{device['token']}/telemetry"
        ok = await api.client.post(url, json={"ts": 1767225601000, "values": {"t": 1.5}})
        assert ok.status_code == 200 and ok.json() == {"stored": 1}
        before = await _stored(api, device)
        json_type = {"content-type": "application/json"}

        cases: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
            ("broken JSON", url, b'{"t": 1', json_type, 400, "line 1 column"),
            ("trailing garbage", url, b'{"t": 1} x', json_type, 400, "invalid JSON"),
            ("empty body", url, b"", json_type, 400, "invalid JSON"),
            ("not UTF-8", url, b'{"t": "\xff"}', json_type, 400, "UTF-8"),
            ("number", url, b"42", json_type, 400, "JSON object"),
            ("string", url, b'"hello"', json_type, 400, "JSON object"),
            ("null", url, b"null", json_type, 400, "JSON object"),
            (
                "empty values",
                url,
                b'{"ts": 1767225600000, "values": {}}',
                json_type,
                400,
                "no values",
            ),
            ("empty array", url, b"[]", json_type, 400, "empty array"),
            ("array of numbers", url, b"[1, 2]", json_type, 400, "item [0]"),
            ("ts as text", url, b'{"ts": "now", "values": {"t": 1}}', json_type, 400, "ts"),
            ("negative ts", url, b'{"ts": -1, "values": {"t": 1}}', json_type, 400, "range"),
            (
                "values not object",
                url,
                b'{"ts": 1767225600005, "values": [1]}',
                json_type,
                400,
                "values",
            ),
            ("NaN", url, b'{"t": NaN}', json_type, 400, "NaN"),
            ("huge number", url, b'{"t": 1e999}', json_type, 400, "range"),
            ("empty key", url, b'{"": 1}', json_type, 400, "1 to 255"),
            ("long key", url, json.dumps({"k" * 256: 1}).encode(), json_type, 400, "1 to 255"),
            (
                "too many points",
                url,
                json.dumps({f"k{i}": i for i in range(10_001)}).encode(),
                json_type,
                400,
                "10000",
            ),
            (
                "one bad item spoils the array",
                url,
                b'[{"t": 2}, {"ts": 1767225600001, "values": 3}]',
                json_type,
                400,
                "[1]",
            ),
            (
                "too large",
                url,
                b'{"t": "' + b"x" * (256 * 1024) + b'"}',
                json_type,
                413,
                "limit",
            ),
            ("bad SenML", url, b'{"n": "t", "v": 1}', {"content-type": SENML}, 400, "SenML"),
            (
                "unknown token",
                "/api/v1/not-a-token/telemetry",
                b'{"t": 1}',
                json_type,
                401,
                "token",
            ),
            (
                "very long token",
                "/api/v1/" + "x" * 4000 + "/telemetry",
                b'{"t": 1}',
                json_type,
                401,
                "token",
            ),
            (
                "disabled device",
                f"/api/v1/{disabled['token']}/telemetry",
                b'{"t": 1}',
                json_type,
                403,
                "disabled",
            ),
        ]
        for label, target, body, headers, status, words in cases:
            answer = await api.client.post(target, content=body, headers=headers)
            assert answer.status_code == status, (label, answer.status_code, answer.text)
            assert answer.headers["content-type"] == "application/json", label
            detail = answer.json()["detail"]
            assert isinstance(detail, str) and words in detail, (label, detail)

        # A chunked body beyond the limit (no Content-Length) is refused the same way.
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"t": "'
            for _ in range(10):
                yield b"x" * 65536
            yield b'"}'

        answer = await api.client.post(url, content=chunks(), headers=json_type)
        assert answer.status_code == 413 and "limit" in answer.json()["detail"]

        assert await _stored(api, device) == before
        assert (await _stored(api, disabled)) == {}

        metrics = (await api.client.get("/metrics")).text
        refused = "iiot_messages_refused_total"
        assert _metric(metrics, refused, protocol="http", reason="invalid_payload") >= 19
        assert _metric(metrics, refused, protocol="http", reason="too_large") == 2
        assert _metric(metrics, refused, protocol="http", reason="unknown_token") == 2
        assert _metric(metrics, refused, protocol="http", reason="device_disabled") == 1
        assert _metric(metrics, "iiot_points_stored_total", protocol="http") == 1

        # Wrong method on the device route.
        answer = await api.client.get(url)
        assert answer.status_code == 405 and answer.json()["detail"]


async def test_payload_forms_and_senml(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        device = await _device(api)
        url = f"/api/v1/{device['token']}/telemetry"
        answer = await api.client.post(url, json={"temperature": 21.5, "on": True, "mode": "auto"})
        assert answer.json() == {"stored": 3}
        # `{}` is ThingsBoard's connection check: 200, nothing stored.
        answer = await api.client.post(
            url, content=b"{}", headers={"content-type": "application/json"}
        )
        assert answer.status_code == 200 and answer.json() == {"stored": 0}
        answer = await api.client.post(
            url,
            json=[
                {"ts": 1_767_225_601_000, "values": {"a": 1}},
                {"ts": 1_767_225_602_000, "values": {"a": 2}},
            ],
        )
        assert answer.json() == {"stored": 2}
        pack = [
            {"bn": "room1/", "bt": 1_767_225_600, "n": "temp", "v": 20.5},
            {"n": "hum", "v": 40},
        ]
        answer = await api.client.post(
            url, content=json.dumps(pack), headers={"content-type": f"{SENML}; charset=utf-8"}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"stored": 2}
        latest = await api.ok(
            "GET", f"/api/devices/{device['id']}/telemetry/latest", headers=api.admin
        )
        assert latest["room1/temp"] == {"ts": 1_767_225_600_000, "value": 20.5}
        assert latest["room1/hum"]["value"] == 40
        assert latest["on"]["value"] is True and latest["mode"]["value"] == "auto"
        assert [p["value"] for p in (await _stored(api, device))["a"]] == [1, 2]

        # Storing the same point twice keeps one row.
        await api.client.post(url, json={"ts": 1_767_225_601_000, "values": {"a": 1}})
        assert [p["value"] for p in (await _stored(api, device))["a"]] == [1, 2]


async def test_many_concurrent_devices(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        devices = [await _device(api, f"d{i}") for i in range(5)]

        async def send(device: dict[str, Any], index: int) -> int:
            answer = await api.client.post(
                f"/api/v1/{device['token']}/telemetry",
                json={"ts": 1_767_225_601_000 + index, "values": {"n": index}},
            )
            return answer.status_code

        codes = await asyncio.gather(*(send(device, i) for device in devices for i in range(100)))
        assert set(codes) == {200}
        for device in devices:
            stored = await _stored(api, device)
            assert [p["value"] for p in stored["n"]] == list(range(100))


class _Proxy:
    """A TCP proxy to PostgreSQL that the test can cut and restore (the shared server stays up)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update({writer, up_writer})


async def test_storage_down_answers_503_with_retry_after(tmp_path: Path, pg_url: str) -> None:
    parts = urlsplit(pg_url)
    proxy = _Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    proxied = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
    try:
        async with api_platform(
            tmp_path, IIOT_DATABASE_URL=proxied, IIOT_COMMIT_TIMEOUT_S="1"
        ) as api:
            device = await _device(api)
            url = f"/api/v1/{device['token']}/telemetry"
            assert (
                await api.client.post(url, json={"ts": 1767225600001, "values": {"v": 1}})
            ).status_code == 200

            await proxy.cut()
            answer = await api.client.post(url, json={"ts": 1767225600002, "values": {"v": 2}})
            assert answer.status_code == 503, answer.text
            assert int(answer.headers["retry-after"]) > 0
            assert "unavailable" in answer.json()["detail"]
            ready = await api.client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["components"]["database"]["state"] == "down"

            await proxy.start()
            deadline = asyncio.get_running_loop().time() + 30
            while True:
                answer = await api.client.post(url, json={"ts": 1767225600003, "values": {"v": 3}})
                if answer.status_code == 200 or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert answer.status_code == 200, answer.text
            values = [p["value"] for p in (await _stored(api, device))["v"]]
            # The refused message may still land (its batch was being retried); nothing is lost.
            assert values in ([1, 3], [1, 2, 3])
    finally:
        await proxy.cut()
