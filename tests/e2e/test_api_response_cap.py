"""One telemetry response carries a bounded number of points; beyond it, a 400 says how to page."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.api_helpers import api_platform

pytestmark = pytest.mark.asyncio

BASE_TS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
KEYS = [f"k{i:02d}" for i in range(11)]


async def test_a_query_that_could_exceed_the_cap_is_refused_with_a_paging_hint(
    tmp_path: Path,
) -> None:
    async with api_platform(tmp_path) as api:
        tenant = await api.tenant("t")
        device = await api.device(api.admin, "d", tenant_id=tenant["id"])
        answer = await api.client.post(
            f"/api/v1/{device['token']}/telemetry",
            json={"ts": BASE_TS, "values": {k: 1 for k in KEYS}},
        )
        assert answer.status_code == 200, answer.text
        url = f"/api/devices/{device['id']}/telemetry"
        # 11 keys x 10,000 points could be 110,000 points: over the documented 100,000,
        # whether the keys are named or meant by leaving them out.
        for params in ({"limit": 10_000}, {"limit": 10_000, "keys": ",".join(KEYS)}):
            answer = await api.client.get(url, params=params, headers=api.admin)
            assert answer.status_code == 400, answer.text
            detail = answer.json()["detail"]
            assert "at most 100000 points" in detail
            assert "limit" in detail and "start" in detail
        # Within the cap the answer comes.
        answer = await api.client.get(url, params={"limit": 9000}, headers=api.admin)
        assert answer.status_code == 200, answer.text
        assert set(answer.json()) == set(KEYS)
