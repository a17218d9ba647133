"""End to end over real HTTP: tenants, admins, devices, telemetry in, raw/latest/aggregates out.

Runs on SQLite and on PostgreSQL (the `pg_url` fixture).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.api_helpers import Api, api_platform

BASE_TS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MINUTE = 60_000


@pytest.fixture(params=["sqlite", "postgres"])
def database_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Settings selecting the store under test."""
    if request.param == "postgres":
        return {"IIOT_DATABASE_URL": request.getfixturevalue("pg_url")}
    return {}


def _series(device_index: int) -> list[tuple[int, float]]:
    """Three minutes of a value every 10 s, different per device."""
    return [(BASE_TS + i * 10_000, round(device_index * 100 + i * 0.5, 3)) for i in range(18)]


async def _send(api: Api, token: str, body: Any) -> dict[str, Any]:
    answer = await api.client.post(f"/api/v1/{token}/telemetry", json=body)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


async def test_full_flow(tmp_path: Path, database_env: dict[str, str]) -> None:
    async with api_platform(tmp_path, **database_env) as api:
        # Two tenants, an administrator each (created by the sysadmin).
        tenants = [await api.tenant("Acme Water"), await api.tenant("Globex Power")]
        admins = []
        for index, tenant in enumerate(tenants):
            user, headers = await api.user(f"admin{index}", "tenant_admin", tenant["id"])
            assert user["tenant_id"] == tenant["id"] and user["role"] == "tenant_admin"
            assert "password" not in user and "password_hash" not in user
            admins.append(headers)

        # Each administrator creates devices in their own tenant (no tenant_id needed).
        devices: list[dict[str, Any]] = []
        for index, headers in enumerate(admins):
            for number in range(2):
                device = await api.device(headers, f"pump-{number}")
                assert device["tenant_id"] == tenants[index]["id"]
                assert device["status"] == "active" and len(device["token"]) >= 22
                devices.append(device)
        listed = await api.ok("GET", "/api/devices", headers=admins[0])
        assert listed["total"] == 2
        assert {d["name"] for d in listed["items"]} == {"pump-0", "pump-1"}
        assert all("token" not in d for d in listed["items"])

        # Telemetry in the three payload forms.
        sent: dict[str, list[tuple[int, float]]] = {}
        for index, device in enumerate(devices):
            series = _series(index)
            sent[device["id"]] = series
            half = len(series) // 2
            answer = await _send(
                api,
                device["token"],
                [
                    {"ts": ts, "values": {"flow": value, "mode": "auto"}}
                    for ts, value in series[:half]
                ],
            )
            assert answer == {"stored": 2 * half}
            for ts, value in series[half:]:
                await _send(api, device["token"], {"ts": ts, "values": {"flow": value}})
            await _send(api, device["token"], {"running": True, "label": f"dev{index}"})

        for index, device in enumerate(devices):
            headers = admins[index // 2]
            url = f"/api/devices/{device['id']}/telemetry"
            series = sent[device["id"]]

            # Raw range, Unix ms.
            raw = await api.ok(
                "GET",
                url,
                headers=headers,
                params={"keys": "flow", "start": BASE_TS, "end": BASE_TS + 3 * MINUTE},
            )
            assert raw == {"flow": [{"ts": ts, "value": value} for ts, value in series]}

            # The same range in ISO 8601, limited and newest first.
            iso = await api.ok(
                "GET",
                url,
                headers=headers,
                params={
                    "keys": "flow,mode",
                    "start": "2026-01-01T00:00:00Z",
                    "end": "2026-01-01T00:03:00+00:00",
                    "limit": 3,
                    "order": "desc",
                },
            )
            assert iso["flow"] == [{"ts": ts, "value": v} for ts, v in reversed(series[-3:])]
            assert [p["value"] for p in iso["mode"]] == ["auto"] * 3

            # Aggregates per minute, compared with Python's arithmetic.
            for agg in ("avg", "min", "max", "sum", "count"):
                result = await api.ok(
                    "GET",
                    url,
                    headers=headers,
                    params={
                        "keys": "flow",
                        "agg": agg,
                        "interval": "1m",
                        "start": BASE_TS,
                        "end": BASE_TS + 3 * MINUTE,
                    },
                )
                expected = []
                for bucket in range(3):
                    values = [
                        v
                        for ts, v in series
                        if BASE_TS + bucket * MINUTE <= ts < BASE_TS + (bucket + 1) * MINUTE
                    ]
                    expected.append((BASE_TS + bucket * MINUTE, _aggregate(agg, values)))
                got = [(p["ts"], p["value"]) for p in result["flow"]]
                assert [ts for ts, _ in got] == [ts for ts, _ in expected]
                for (_, value), (_, want) in zip(got, expected, strict=True):
                    assert value == pytest.approx(want), agg

            # Latest values keep their JSON types.
            latest = await api.ok("GET", f"{url}/latest", headers=headers)
            assert latest["flow"] == {"ts": series[-1][0], "value": series[-1][1]}
            assert latest["running"]["value"] is True
            assert latest["label"]["value"] == f"dev{index}"
            assert abs(latest["running"]["ts"] - time.time() * 1000) < 60_000
            only = await api.ok("GET", f"{url}/latest", headers=headers, params={"keys": "mode"})
            assert set(only) == {"mode"}

        # A tenant user reads but cannot write.
        _, reader = await api.user("reader0", "tenant_user", tenants[0]["id"])
        first = devices[0]
        assert (await api.ok("GET", f"/api/devices/{first['id']}", headers=reader))[
            "name"
        ] == "pump-0"
        for method, url, body in [
            ("POST", "/api/devices", {"name": "x"}),
            ("PATCH", f"/api/devices/{first['id']}", {"status": "disabled"}),
            ("DELETE", f"/api/devices/{first['id']}", None),
            ("POST", f"/api/devices/{first['id']}/token", None),
        ]:
            answer = await api.client.request(method, url, json=body, headers=reader)
            assert answer.status_code == 403, (method, url, answer.text)
            assert "read-only" in answer.json()["detail"]

        # Token rotation: the old token stops working at once, the new one works.
        rotated = await api.ok("POST", f"/api/devices/{first['id']}/token", headers=admins[0])
        assert rotated["token"] != first["token"] and rotated["id"] == first["id"]
        old = await api.client.post(f"/api/v1/{first['token']}/telemetry", json={"x": 1})
        assert old.status_code == 401
        await _send(api, rotated["token"], {"x": 2})

        # Disabling refuses data; re-enabling accepts it again.
        await api.ok(
            "PATCH", f"/api/devices/{first['id']}", json={"status": "disabled"}, headers=admins[0]
        )
        refused = await api.client.post(f"/api/v1/{rotated['token']}/telemetry", json={"x": 3})
        assert refused.status_code == 403 and "disabled" in refused.json()["detail"]
        await api.ok(
            "PATCH", f"/api/devices/{first['id']}", json={"status": "active"}, headers=admins[0]
        )
        await _send(api, rotated["token"], {"x": 4})
        latest = await api.ok("GET", f"/api/devices/{first['id']}/telemetry/latest", headers=reader)
        assert latest["x"]["value"] == 4

        # Retention is set by the sysadmin and returned.
        changed = await api.ok(
            "PATCH",
            f"/api/tenants/{tenants[0]['id']}",
            json={"retention_days": 30},
            headers=api.admin,
        )
        assert changed["retention_days"] == 30
        cleared = await api.ok(
            "PATCH",
            f"/api/tenants/{tenants[0]['id']}",
            json={"retention_days": None},
            headers=api.admin,
        )
        assert cleared["retention_days"] is None

        # Deleting a device removes it and its token.
        await api.ok("DELETE", f"/api/devices/{devices[1]['id']}", 204, headers=admins[0])
        gone = await api.client.get(f"/api/devices/{devices[1]['id']}", headers=admins[0])
        assert gone.status_code == 404
        dead = await api.client.post(f"/api/v1/{devices[1]['token']}/telemetry", json={"x": 1})
        assert dead.status_code == 401

        # Observability.
        assert (await api.ok("GET", "/healthz")) == {"status": "ok"}
        ready = await api.ok("GET", "/readyz")
        assert ready["components"]["database"]["state"] == "up"
        assert ready["components"]["amqp"]["state"] == "off"
        metrics = (await api.client.get("/metrics")).text
        assert 'iiot_points_stored_total{protocol="http"}' in metrics
        assert (
            'iiot_messages_refused_total{protocol="http",reason="device_disabled"} 1.0' in metrics
        )
        assert 'route="/api/devices/{device_id}/telemetry"' in metrics
        assert "iiot_write_seconds_bucket" in metrics and "iiot_batch_points_bucket" in metrics


def _aggregate(agg: str, values: list[float]) -> float:
    if agg == "avg":
        return sum(values) / len(values)
    if agg == "min":
        return min(values)
    if agg == "max":
        return max(values)
    if agg == "sum":
        return sum(values)
    return len(values)


async def test_query_limits_and_time_formats(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        tenant = await api.tenant("t")
        device = await api.device(api.admin, "d", tenant_id=tenant["id"])
        url = f"/api/devices/{device['id']}/telemetry"
        await _send(
            api, device["token"], [{"ts": BASE_TS + i, "values": {"v": i}} for i in range(50)]
        )
        bad = {
            "limit=0": {"limit": 0},
            "limit too big": {"limit": 10_001},
            "end before start": {"start": BASE_TS + 10, "end": BASE_TS},
            "bad time": {"start": "yesterday"},
            "negative time": {"start": -5},
            "too many buckets": {"agg": "avg", "interval": "1s", "start": 0, "end": BASE_TS},
            "bad interval": {"agg": "avg", "interval": "5 parsecs", "start": 0, "end": 1000},
            "agg without interval": {"agg": "avg", "start": 0, "end": 1000},
            "agg without range": {"agg": "sum", "interval": "1h"},
            "unknown agg": {"agg": "median", "interval": "1h", "start": 0, "end": 1000},
            "interval without agg": {"interval": "1h"},
        }
        for label, params in bad.items():
            answer = await api.client.get(url, params=params, headers=api.admin)
            assert answer.status_code == 400, (label, answer.text)
            assert isinstance(answer.json()["detail"], str) and answer.json()["detail"], label
        # The bucket limit names what to do.
        answer = await api.client.get(url, params=bad["too many buckets"], headers=api.admin)
        assert "10000" in answer.json()["detail"]

        iso_naive = datetime.fromtimestamp((BASE_TS + 10) / 1000, UTC).replace(tzinfo=None)
        raw = await api.ok(
            "GET",
            url,
            headers=api.admin,
            params={"start": iso_naive.isoformat(), "end": BASE_TS + 20},
        )
        assert [p["value"] for p in raw["v"]] == list(range(10, 20))
        counted = await api.ok(
            "GET",
            url,
            headers=api.admin,
            params={"agg": "count", "interval": "10ms", "start": BASE_TS, "end": BASE_TS + 50},
        )
        assert counted["v"] == [{"ts": BASE_TS + i * 10, "value": 10} for i in range(5)]
        limited = await api.ok("GET", url, headers=api.admin, params={"limit": 10_000})
        assert len(limited["v"]) == 50
        assert await api.ok("GET", url, headers=api.admin, params={"keys": "nope"}) == {}
