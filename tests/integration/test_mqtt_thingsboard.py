"""ThingsBoard's own MQTT clients (tb-mqtt-client from PyPI) against the embedded endpoint."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from uuid import UUID

import pytest

from iiot.app import Platform

tb_device_mqtt = pytest.importorskip("tb_device_mqtt")
tb_gateway_mqtt = pytest.importorskip("tb_gateway_mqtt")

from tests.integration.test_mqtt_support import BASE_TS, create_devices  # noqa: E402
from tests.support import free_port, platform_env, running_platform  # noqa: E402


def _wait_connected(client: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not client.is_connected():
        if time.monotonic() > deadline:
            raise TimeoutError("the ThingsBoard client did not connect")
        time.sleep(0.05)


async def _gateway(platform: Platform) -> tuple[UUID, UUID, str]:
    """A device of type "gateway": (tenant id, device id, token)."""
    services = platform.services
    tenant = await services.store.create_tenant("plant")
    device, token = await services.registry.create_device(tenant.id, "gateway-1", type="gateway")
    return tenant.id, device.id, token


async def test_tb_device_client_mqtt5_connects_and_sends_telemetry(tmp_path):
    port = free_port()
    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        [dev] = await create_devices(platform, 1)
        client = tb_device_mqtt.TBDeviceMqttClient("127.0.0.1", port, username=dev.token)
        client.connect()
        try:
            await asyncio.to_thread(_wait_connected, client)
            sent = client.send_telemetry({"ts": BASE_TS, "values": {"temperature": 21.5}})
            result = await asyncio.to_thread(sent.get)
            assert result == tb_device_mqtt.TBPublishInfo.TB_ERR_SUCCESS
            empty = client.send_telemetry({})  # ThingsBoard's connection check
            assert await asyncio.to_thread(empty.get) == tb_device_mqtt.TBPublishInfo.TB_ERR_SUCCESS
        finally:
            client.disconnect()
        latest = await platform.services.store.latest(None, UUID(dev.id))
        assert latest["temperature"].ts == BASE_TS and latest["temperature"].value == 21.5
        assert set(latest) == {"temperature"}


async def test_tb_gateway_client_creates_and_feeds_children(tmp_path):
    port = free_port()
    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        tenant_id, gateway_id, token = await _gateway(platform)
        client = tb_gateway_mqtt.TBGatewayMqttClient("127.0.0.1", port, username=token)
        client.connect()
        try:
            await asyncio.to_thread(_wait_connected, client)
            for name in ("Device A", "Device B"):
                info = client.gw_connect_device(name, "thermometer")
                assert await asyncio.to_thread(info.get) == 0
            for seq, name in enumerate(("Device A", "Device B")):
                values = {"ts": BASE_TS + seq, "values": {"temperature": 40 + seq}}
                info = client.gw_send_telemetry(name, values)
                assert await asyncio.to_thread(info.get) == 0
        finally:
            client.disconnect()
        store = platform.services.store
        devices = {d.name: d for d in (await store.list_devices(tenant_id, 100, 0)).items}
        assert set(devices) == {"gateway-1", "Device A", "Device B"}
        for seq, name in enumerate(("Device A", "Device B")):
            child = devices[name]
            assert child.tenant_id == tenant_id
            latest = await store.latest(tenant_id, child.id)
            assert latest["temperature"].ts == BASE_TS + seq
            assert latest["temperature"].value == 40 + seq
        assert await store.latest(tenant_id, gateway_id) == {}
