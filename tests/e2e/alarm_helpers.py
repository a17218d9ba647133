"""Helpers of the alarm end-to-end tests: rules, telemetry over HTTP, waiting for alarms."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from tests.e2e.api_helpers import Api

__all__ = ["db_env", "now_ms", "rule_body", "send", "wait_for"]

T = TypeVar("T")


@pytest.fixture(params=["sqlite", "postgres"])
def db_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The platform's database: SQLite in the data dir, or a throwaway PostgreSQL one."""
    if request.param == "sqlite":
        return {}
    return {"IIOT_DATABASE_URL": str(request.getfixturevalue("pg_url"))}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def rule_body(device_id: str, **extra: Any) -> dict[str, Any]:
    """A threshold rule `t > 80` on one device, changed by `extra`."""
    body: dict[str, Any] = {
        "name": "High temperature",
        "target": {"device_id": device_id},
        "key": "t",
        "severity": "MAJOR",
        "create": {"op": "gt", "value": 80},
    }
    body.update(extra)
    return body


async def send(api: Api, token: str, ts: int, **values: Any) -> None:
    """Telemetry through the device HTTP API (200 = committed)."""
    await api.ok("POST", f"/api/v1/{token}/telemetry", json={"ts": ts, "values": values})


async def wait_for(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout_s: float = 20
) -> T:
    """Poll `probe` until `done(result)`; the last result fails the test on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s: {result!r}")
        await asyncio.sleep(0.05)
