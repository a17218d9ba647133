"""The two defects reproduced against a running platform on PostgreSQL: a 5,000-digit
number and NUL / lone-surrogate text are clean 400s, never reach the database, never
fail other devices' messages, and no log line carries the device token."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tests.e2e.api_helpers import api_platform

TS = 1_767_225_600_000

HOSTILE = [
    (b'{"a": ' + b"1" * 5000 + b"}", "invalid JSON"),
    (b'{"a\\u0000b": 1}', "NUL"),
    (b'{"a": "x\\u0000y"}', "NUL"),
    (b'{"\\ud800": 1}', "surrogate"),
    (b'{"a": "\\ud800"}', "surrogate"),
]


async def test_hostile_text_is_a_clean_400_beside_good_traffic(
    tmp_path: Path, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with api_platform(tmp_path, IIOT_DATABASE_URL=pg_url) as api:
        tenant = await api.tenant("plant")
        bad = await api.device(api.admin, "bad", tenant_id=tenant["id"])
        good = await api.device(api.admin, "good", tenant_id=tenant["id"])
        headers = {"content-type": "application/json"}

        async def send_good(i: int) -> int:
            answer = await api.client.post(
                f"/api/v1/{good['token']}/telemetry",
                json={"ts": TS + i, "values": {"t": i}},
            )
            return answer.status_code

        for round_ in range(3):
            tasks = [asyncio.create_task(send_good(round_ * 100 + i)) for i in range(20)]
            for body, what in HOSTILE:
                answer = await api.client.post(
                    f"/api/v1/{bad['token']}/telemetry", content=body, headers=headers
                )
                assert answer.status_code == 400, answer.text
                assert what in answer.json()["detail"]
            assert await asyncio.gather(*tasks) == [200] * 20

        stored = await api.ok(
            "GET",
            f"/api/devices/{good['id']}/telemetry",
            headers=api.admin,
            params={"limit": 1000, "start": TS, "end": TS + 1000},
        )
        assert sorted(p["ts"] - TS for p in stored["t"]) == sorted(
            r * 100 + i for r in range(3) for i in range(20)
        )
        nothing = await api.ok("GET", f"/api/devices/{bad['id']}/telemetry", headers=api.admin)
        assert nothing == {}
    for record in caplog.records:
        if record.name.startswith("httpx"):  # the test's own client
            continue
        assert bad["token"] not in record.getMessage()
        assert good["token"] not in record.getMessage()
