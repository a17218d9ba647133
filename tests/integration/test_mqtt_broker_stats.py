"""The external broker's dropped-message counter: exported as a metric, warned about."""

from __future__ import annotations

import asyncio
import logging
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.integration.test_mqtt_support import private_mosquitto, wait_for_health
from tests.support import platform_env, running_platform

QUEUE_LIMIT = 5


def _offline_session(port: int, client_id: str, topic: str) -> None:
    """A persistent QoS 1 subscriber that goes away: the broker queues its messages."""
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False
    )
    subscribed: list[int] = []
    client.on_subscribe = lambda *args: subscribed.append(1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe(topic, qos=1)
    deadline = time.monotonic() + 10
    while not subscribed and time.monotonic() < deadline:
        time.sleep(0.02)
    client.disconnect()
    client.loop_stop()


def _publish(port: int, topic: str, count: int) -> None:
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = [client.publish(topic, str(i), qos=1) for i in range(count)]
    for info in infos:
        info.wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


async def _gauge(platform, broker: str, at_least: float, timeout_s: float = 30) -> float:
    """The exported count, once the platform has read one that is at least `at_least`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in platform.services.metrics.render().decode().splitlines():
            if line.startswith(f'iiot_mqtt_broker_dropped_messages{{broker="{broker}"}}'):
                value = float(line.split()[-1])
                if value >= at_least:
                    return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"iiot_mqtt_broker_dropped_messages for {broker} not >= {at_least}")


async def test_dropped_messages_are_exported_and_warned_about(tmp_path, caplog) -> None:
    extra = f"allow_anonymous true\nsys_interval 1\nmax_queued_messages {QUEUE_LIMIT}\n"
    with private_mosquitto(tmp_path, extra) as broker:
        url = f"mqtt://127.0.0.1:{broker.port}"
        env = platform_env(tmp_path / "data", IIOT_MQTT_URL=url)
        caplog.set_level(logging.WARNING, logger="iiot.adapters.mqtt_broker_stats")
        async with running_platform(env) as platform:
            await wait_for_health(platform, "mqtt", "up")
            before = await _gauge(platform, url, 0)
            assert not [r for r in caplog.records if "dropped" in r.getMessage()]
            # A slow consumer's session fills up: the broker keeps 5 and drops the rest.
            await asyncio.to_thread(_offline_session, broker.port, "laggard", "lag/#")
            await asyncio.to_thread(_publish, broker.port, "lag/a", 50)
            after = await _gauge(platform, url, before + 50 - QUEUE_LIMIT)
            assert after - before == 50 - QUEUE_LIMIT
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
                if warnings:
                    break
                await asyncio.sleep(0.1)
            assert warnings, "no warning in the log"
            assert f"dropped {50 - QUEUE_LIMIT} messages" in warnings[0]
            assert "max_queued_messages" in warnings[0]
