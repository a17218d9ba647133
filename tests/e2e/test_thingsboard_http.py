"""ThingsBoard's own HTTP device client (`tb_device_http`, from tb-mqtt-client) unchanged."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from tb_device_http import TBHTTPDevice

from tests.e2e.api_helpers import api_platform


async def test_tb_http_device_connects_and_its_queued_telemetry_is_stored(tmp_path: Path) -> None:
    async with api_platform(tmp_path) as api:
        tenant = await api.tenant("acme")
        device = await api.device(api.admin, "press-1", tenant_id=tenant["id"])
        client = TBHTTPDevice(str(api.client.base_url).rstrip("/"), device["token"])
        # connect() posts `{}` (ThingsBoard's connection check) and starts its publisher.
        assert await asyncio.to_thread(client.connect) is True
        client.send_telemetry({"temperature": 21.5, "running": True})  # queued
        try:
            latest: dict[str, object] = {}
            deadline = time.monotonic() + 20
            while "temperature" not in latest and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                store = api.platform.services.store
                latest = dict(await store.latest(None, uuid.UUID(device["id"])))
        finally:
            client.stop_publish_worker()
        assert latest["temperature"].value == 21.5  # type: ignore[attr-defined]
        assert latest["running"].value is True  # type: ignore[attr-defined]
