"""The live bridge between split roles over the real PostgreSQL LISTEN/NOTIFY.

Two platforms in one test process stand for an `ingest` and an `api` process: points
committed by the ingest one reach the api one's live bus, and a device disabled through
the api one reaches the ingest one, whose token cache then refuses the device's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from iiot.app import Platform, RunRole
from iiot.bus import DeviceEvent, LiveEvent, TelemetryEvent, TenantEvent
from iiot.config import load_settings
from iiot.errors import DeviceDisabled
from iiot.livebridge import LiveBridge, decode, encode
from iiot.model import Device, DevicePoints, Point, Tenant
from iiot.services import HealthBoard
from tests.support import platform_env


@contextlib.asynccontextmanager
async def _platform(pg_url: str, folder: Path, role: RunRole) -> AsyncIterator[Platform]:
    env = platform_env(folder, IIOT_DATABASE_URL=pg_url)
    async with Platform(load_settings(env), role) as platform:
        yield platform


async def _next(
    queue: asyncio.Queue[LiveEvent], wanted: Callable[[LiveEvent], bool], timeout_s: float = 15
) -> LiveEvent:
    async with asyncio.timeout(timeout_s):
        while True:
            event = await queue.get()
            if wanted(event):
                return event


async def test_events_cross_between_roles(pg_url: str, tmp_path: Path) -> None:
    async with (
        _platform(pg_url, tmp_path / "api", "api") as api,
        _platform(pg_url, tmp_path / "ingest", "ingest") as ingest,
    ):
        for platform in (api, ingest):
            await _wait_bridge_up(platform)
        tenant = await api.services.store.create_tenant("acme")
        device, token = await api.services.registry.create_device(tenant.id, "press-1")
        api_live = api.services.bus.subscribe()
        ingest_live = ingest.services.bus.subscribe()

        body = json.dumps({"ts": 1_767_225_600_000, "values": {"t": 21.5, "on": True}})
        await ingest.services.ingestor.ingest_token(token, body.encode(), "test")
        event = await _next(api_live, lambda e: isinstance(e, TelemetryEvent))
        assert isinstance(event, TelemetryEvent)
        [item] = event.batch
        assert item.device.id == device.id
        assert {(p.key, p.ts, p.value) for p in item.points} == {
            ("t", 1_767_225_600_000, 21.5),
            ("on", 1_767_225_600_000, True),
        }

        await api.services.registry.update_device(None, device.id, status="disabled")
        change = await _next(
            ingest_live, lambda e: isinstance(e, DeviceEvent) and e.kind == "updated"
        )
        assert isinstance(change, DeviceEvent)
        assert change.device.status == "disabled"
        # The ingest role dropped its cached copy: the device's data is refused now.
        with pytest.raises(DeviceDisabled):
            await ingest.services.ingestor.ingest_token(token, body.encode(), "test")


async def _wait_bridge_up(platform: Platform) -> None:
    async with asyncio.timeout(15):
        while not _bridge_up(platform):  # noqa: ASYNC110 - the bridge reports on the board
            await asyncio.sleep(0.02)


def _bridge_up(platform: Platform) -> bool:
    health = platform.services.health.components.get("livebridge")
    return health is not None and health.state == "up"


def test_large_batches_are_split_under_the_notify_limit() -> None:
    device = Device(id=uuid.uuid4(), tenant_id=uuid.uuid4(), name="d", status="active")
    points = tuple(Point(f"key-{i}", 1000 + i, "x" * 50) for i in range(2000))
    payloads = encode(TelemetryEvent([DevicePoints(device, points)]), "me")
    assert len(payloads) > 1
    assert all(len(p.encode()) < 8000 for p in payloads)
    back = [decode(p) for p in payloads]
    assert {o for o, _ in back} == {"me"}
    received = [
        p for _, e in back if isinstance(e, TelemetryEvent) for item in e.batch for p in item.points
    ]
    assert tuple(received) == points


def test_tenant_events_cross_unchanged() -> None:
    for tenant in (Tenant(uuid.uuid4(), "plant north", 1_767_225_600_000, 30),
                   Tenant(uuid.uuid4(), "plant \u00e9st", 1_767_225_600_001, None)):  # fmt: skip
        for kind in ("updated", "deleted"):
            event = TenantEvent(kind, tenant)
            [payload] = encode(event, "me")
            assert decode(payload) == ("me", event)


async def test_the_bridge_counts_as_down_until_it_listens(pg_url: str, tmp_path: Path) -> None:
    # Readiness answers 200 when no component on the health board is down: a bridge that
    # appeared on the board only once connected let a node say "ready" before it could
    # forward commands and live values (seen in the three-node test).
    async with _platform(pg_url, tmp_path / "api", "api") as api:
        services = dataclasses.replace(api.services, health=HealthBoard())
        async with LiveBridge(services):
            assert services.health.components["livebridge"].state == "down"
            async with asyncio.timeout(15):
                while services.health.components["livebridge"].state != "up":  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
