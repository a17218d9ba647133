"""Per-tenant telemetry retention, applied by the running platform and visible in the API.

Points are sent through the device HTTP API with old timestamps; the platform's retention
job (every second here) must remove exactly those older than each tenant's
`retention_days`, in several batches, and leave other tenants and latest values alone.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ADMIN_PASSWORD, free_port, platform_env, running_platform

DAY_MS = 86_400_000
OLD_POINTS = 7_500  # more than one delete batch (5,000) in one series
TIMEOUT = httpx.Timeout(30.0)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database of each store kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'iiot.db'}"
    return str(request.getfixturevalue("pg_url"))


async def _send(client: httpx.AsyncClient, token: str, items: list[dict[str, Any]]) -> None:
    for start in range(0, len(items), 2500):  # stay under the message size limit
        answer = await client.post(
            f"/api/v1/{token}/telemetry", content=json.dumps(items[start : start + 2500])
        )
        assert answer.status_code == 200, answer.text


async def _days(client: httpx.AsyncClient, device_id: str, now: int) -> dict[int, int]:
    """Points of key `temp` per age in days (0 = today), as a user would ask for them."""
    answer = await client.get(
        f"/api/devices/{device_id}/telemetry",
        params={
            "keys": "temp",
            "agg": "count",
            "interval": "1d",
            "start": now - 40 * DAY_MS,
            "end": now + DAY_MS,
        },
    )
    assert answer.status_code == 200, answer.text
    return {(now - p["ts"]) // DAY_MS: p["value"] for p in answer.json().get("temp", [])}


async def _until(check: Any, timeout_s: float = 30.0) -> Any:
    """Poll `check()` until it returns something truthy (bounded)."""
    async with asyncio.timeout(timeout_s):
        while not (result := await check()):  # noqa: ASYNC110 - polls the API
            await asyncio.sleep(0.2)
    return result


async def test_retention_removes_only_expired_points(database_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = platform_env(
        tmp_path / "data",
        IIOT_DATABASE_URL=database_url,
        IIOT_HTTP_PORT=str(port),
        IIOT_RETENTION_INTERVAL_S="1",
    )
    async with (
        running_platform(env),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as client,
    ):
        login = await client.post(
            "/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        client.headers["Authorization"] = f"Bearer {login.json()['access_token']}"
        short = await client.post("/api/tenants", json={"name": "short", "retention_days": 7})
        assert short.status_code == 201, short.text
        assert short.json()["retention_days"] == 7
        keep = await client.post("/api/tenants", json={"name": "forever"})
        assert keep.json()["retention_days"] is None

        now = int(time.time() * 1000)
        devices = {}
        for tenant in (short.json(), keep.json()):
            made = await client.post(
                "/api/devices", json={"name": "press", "tenant_id": tenant["id"]}
            )
            assert made.status_code == 201, made.text
            device = made.json()
            devices[tenant["name"]] = device["id"]
            items = [
                {"ts": now - 20 * DAY_MS + i, "values": {"temp": i % 100, "label": "old"}}
                for i in range(OLD_POINTS)
            ]
            items += [{"ts": now - age * DAY_MS, "values": {"temp": age}} for age in (10, 8, 6)]
            # An hour ago, but never before today's midnight (UTC): days are counted in buckets.
            today = now - min(3_600_000, now % DAY_MS)
            items.append({"ts": today, "values": {"temp": 21.5, "label": "new"}})
            await _send(client, device["token"], items)

        expected_keep = {20: OLD_POINTS, 10: 1, 8: 1, 6: 1, 0: 1}
        assert await _days(client, devices["forever"], now) == expected_keep

        async def short_trimmed() -> bool:
            return await _days(client, devices["short"], now) == {6: 1, 0: 1}

        await _until(short_trimmed)
        latest = await client.get(f"/api/devices/{devices['short']}/telemetry/latest")
        assert latest.json()["label"]["value"] == "new"
        assert latest.json()["temp"]["value"] == 21.5

        # A retention set later applies at the next run; the API shows it.
        changed = await client.patch(
            f"/api/tenants/{keep.json()['id']}", json={"retention_days": 9}
        )
        assert changed.status_code == 200, changed.text
        shown = await client.get(f"/api/tenants/{keep.json()['id']}")
        assert shown.json()["retention_days"] == 9

        async def keep_trimmed() -> bool:
            return await _days(client, devices["forever"], now) == {8: 1, 6: 1, 0: 1}

        await _until(keep_trimmed)

        # Clearing it keeps data forever again.
        cleared = await client.patch(
            f"/api/tenants/{keep.json()['id']}", json={"retention_days": None}
        )
        assert cleared.json()["retention_days"] is None

        metrics = (await client.get("/metrics")).text
        deleted = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("iiot_retention_deleted_points_total ")
        )
        # temp and label points older than each retention: 20, 10, 8 days; then 20, 10 days.
        assert deleted == (2 * OLD_POINTS + 2) + (2 * OLD_POINTS + 1)
        ready = (await client.get("/readyz")).json()
        assert ready["components"]["retention"]["state"] == "up"
