"""The embedded MQTT broker with real paho clients: exactly-once storage, login and topic rules."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any
from uuid import UUID

import pytest

from tests.integration.test_mqtt_support import (
    BASE_TS,
    close_client,
    connect,
    create_devices,
    mosquitto_pub_lines,
    payload,
    publish_all,
    telemetry_counts,
    wait_for_rows,
)
from tests.support import free_port, platform_env, running_platform


@pytest.fixture
def mqtt_port() -> int:
    return free_port()


def _metric(platform: Any, line_start: str) -> float:
    for line in platform.services.metrics.render().decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_10000_qos1_messages_stored_exactly_once(tmp_path, pg_url, mqtt_port):
    env = platform_env(tmp_path, IIOT_DATABASE_URL=pg_url, IIOT_MQTT_PORT=str(mqtt_port))
    async with running_platform(env) as platform:
        devices = await create_devices(platform, 10)
        await asyncio.to_thread(publish_all, mqtt_port, devices, 1000)
        # Every PUBACK came after the commit, so everything is there once they all arrived.
        rows, distinct = await telemetry_counts(pg_url)
        assert rows == distinct == 10 * 1000 * 3
        assert _metric(platform, 'iiot_points_stored_total{protocol="mqtt"}') == 30000
        assert platform.services.health.components["mqtt"].state == "up"


async def test_puback_means_stored_and_qos0_is_stored(tmp_path, mqtt_port):
    env = platform_env(tmp_path, IIOT_MQTT_PORT=str(mqtt_port))
    async with running_platform(env) as platform:
        [dev] = await create_devices(platform, 1)
        store = platform.services.store
        client = await asyncio.to_thread(connect, mqtt_port, dev.id, dev.token, "one")
        try:
            info = client.publish(f"devices/{dev.id}/telemetry", payload(7), qos=1)
            await asyncio.to_thread(info.wait_for_publish, 10)
            assert info.is_published()
            latest = await store.latest(None, UUID(dev.id))
            assert latest["pressure"].ts == BASE_TS + 7
            client.publish(f"devices/{dev.id}/telemetry", payload(8), qos=0)
            for _ in range(200):
                latest = await store.latest(None, UUID(dev.id))
                if latest["pressure"].ts == BASE_TS + 8:
                    break
                await asyncio.sleep(0.05)
            assert latest["pressure"].ts == BASE_TS + 8
        finally:
            await close_client(client)


async def test_wrong_password_is_refused_and_counted(tmp_path, mqtt_port):
    env = platform_env(tmp_path, IIOT_MQTT_PORT=str(mqtt_port))
    async with running_platform(env) as platform:
        [dev, other] = await create_devices(platform, 2)
        for username, password in [
            (dev.id, "wrong-token"),
            (dev.id, other.token),  # a real token, but another device's
            (None, None),  # anonymous
        ]:
            with pytest.raises(PermissionError):
                await asyncio.to_thread(connect, mqtt_port, username, password, "bad")
        assert _metric(platform, 'iiot_auth_failures_total{protocol="mqtt"}') == 3


async def test_other_devices_topic_is_refused_and_nothing_stored(tmp_path, mqtt_port, caplog):
    env = platform_env(tmp_path, IIOT_MQTT_PORT=str(mqtt_port))
    async with running_platform(env) as platform:
        [dev, victim] = await create_devices(platform, 2)
        client = await asyncio.to_thread(connect, mqtt_port, dev.id, dev.token, "intruder")
        granted: list[Any] = []
        subscribed = threading.Event()
        dropped = threading.Event()

        def on_subscribe(c: Any, u: Any, mid: int, reasons: list[Any], p: Any) -> None:
            granted.extend(reasons)
            subscribed.set()

        client.on_subscribe = on_subscribe
        client.on_disconnect = lambda *args: dropped.set()
        try:
            client.subscribe("devices/+/telemetry", qos=1)
            assert await asyncio.to_thread(subscribed.wait, 10)
            assert granted[0].is_failure  # SUBACK 0x80; the connection stays
            # Its own topic still works, so the refusal above was about the topic alone.
            own = client.publish(f"devices/{dev.id}/telemetry", payload(2), qos=1)
            await asyncio.to_thread(own.wait_for_publish, 10)
            assert own.is_published()
            # MQTT 3.1.1 has no negative PUBACK: the PUBACK is withheld and the connection
            # closed (documented), so the device learns the message was not taken.
            with caplog.at_level(logging.INFO, logger="iiot.adapters.mqtt_server"):
                client.publish(f"devices/{victim.id}/telemetry", payload(1), qos=1)
                assert await asyncio.to_thread(dropped.wait, 10)
        finally:
            await close_client(client)
        store = platform.services.store
        assert await store.latest(None, UUID(victim.id)) == {}
        assert (await store.latest(None, UUID(dev.id)))["pressure"].ts == BASE_TS + 2
        refused = 'iiot_messages_refused_total{protocol="mqtt",reason="forbidden_topic"}'
        assert _metric(platform, refused) == 1
        subscription = (
            'iiot_messages_refused_total{protocol="mqtt",reason="forbidden_subscription"}'
        )
        assert _metric(platform, subscription) == 1
        assert any(
            f"may not publish to 'devices/{victim.id}/telemetry'" in r.getMessage()
            for r in caplog.records
        )


async def test_taken_port_is_one_line_and_the_platform_runs(tmp_path, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = platform_env(tmp_path, IIOT_MQTT_PORT=str(port))
        with caplog.at_level(logging.ERROR):
            async with running_platform(env) as platform:
                health = platform.services.health.components["mqtt"]
                assert health.state == "down"
                assert "IIOT_MQTT_PORT" in health.detail and "IIOT_MQTT_URL" in health.detail
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1
        message = errors[0].getMessage()
        assert f"MQTT port {port} is taken" in message and "\n" not in message
        assert errors[0].exc_info is None


@pytest.mark.parametrize(("version", "token_as_username"), [("mqttv311", False), ("mqttv5", True)])
async def test_mosquitto_pub_10000_messages_stored_exactly_once(
    tmp_path, pg_url, mqtt_port, version, token_as_username
):
    env = platform_env(tmp_path, IIOT_DATABASE_URL=pg_url, IIOT_MQTT_PORT=str(mqtt_port))
    async with running_platform(env) as platform:
        [dev] = await create_devices(platform, 1)
        # Both username forms: device id + token, and ThingsBoard's token alone.
        username, password = (dev.token, None) if token_as_username else (dev.id, dev.token)
        topic = "v1/devices/me/telemetry" if token_as_username else None
        done = await asyncio.to_thread(
            mosquitto_pub_lines, mqtt_port, dev, 10_000, username, password, version, topic
        )
        assert done.returncode == 0, done.stderr
        rows = await wait_for_rows(pg_url, 30_000, timeout_s=30)
        assert (rows, (await telemetry_counts(pg_url))[1]) == (30_000, 30_000)
