"""Fault tests of MQTT ingestion through a private Mosquitto: no point lost, none duplicated.

Each run publishes 20,000 QoS 1 messages (3 points each, explicit ts) and, mid-run, restarts
Mosquitto, kills the platform with SIGKILL and starts it again, or cuts PostgreSQL off for 20 s.
Afterwards every point is in PostgreSQL exactly once and the subscription is back.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.integration.test_mqtt_support import (
    Dev,
    create_devices,
    payload,
    private_mosquitto,
    telemetry_counts,
    wait_for_health,
    wait_for_rows,
)
from tests.support import free_port, platform_env, platform_process, running_platform
from tests.tcp_proxy import TcpProxy

DEVICES = 10
PER_DEVICE = 2_000  # 20,000 messages, 60,000 points
POINTS = DEVICES * PER_DEVICE * 3


class Publishers:
    """One resilient paho publisher per device (reconnects and resends by itself)."""

    def __init__(self, port: int, devices: list[Dev]) -> None:
        self.port = port
        self.devices = devices
        self.errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._guarded, args=(d,)) for d in devices]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self, timeout_s: float = 180) -> None:
        for thread in self._threads:
            thread.join(timeout_s)
        if self.errors:
            raise self.errors[0]

    def _guarded(self, dev: Dev) -> None:
        try:
            self._run(dev)
        except BaseException as exc:  # re-raised in the test's thread by join()
            self.errors.append(exc)

    def _run(self, dev: Dev) -> None:
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"pub-{dev.id[:12]}",
            protocol=paho.MQTTv311,
            clean_session=False,
        )
        client.max_inflight_messages_set(50)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(0.2, 2)
        client.username_pw_set(dev.id, dev.token)
        client.connect(host="127.0.0.1", port=self.port)
        client.loop_start()
        try:
            infos = []
            for seq in range(PER_DEVICE):
                infos.append(client.publish(f"devices/{dev.id}/telemetry", payload(seq), qos=1))
                if seq % 100 == 0:
                    time.sleep(0.01)  # spread the run over a few seconds, as devices do
            deadline = time.monotonic() + 150
            for info in infos:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
                assert info.is_published(), "Mosquitto never acknowledged a message"
        finally:
            client.disconnect()
            client.loop_stop()


async def _wait_rows_at_least(pg_url: str, rows: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (await telemetry_counts(pg_url))[0] < rows:
        assert time.monotonic() < deadline, f"fewer than {rows} rows after {timeout_s} s"
        await asyncio.sleep(0.05)


async def _assert_exactly_once(pg_url: str) -> None:
    rows = await wait_for_rows(pg_url, POINTS, timeout_s=90)
    assert rows == POINTS
    assert await telemetry_counts(pg_url) == (POINTS, POINTS)


async def test_mosquitto_restart_mid_run(tmp_path, pg_url):
    with private_mosquitto(tmp_path) as broker:
        url = f"mqtt://127.0.0.1:{broker.port}?client_id=iiot-fault-restart"
        env = platform_env(tmp_path, IIOT_DATABASE_URL=pg_url, IIOT_MQTT_URL=url)
        async with running_platform(env) as platform:
            await wait_for_health(platform, "mqtt", "up")
            devices = await create_devices(platform, DEVICES)
            publishers = Publishers(broker.port, devices)
            publishers.start()
            await _wait_rows_at_least(pg_url, POINTS // 4)
            await asyncio.to_thread(broker.stop)
            await wait_for_health(platform, "mqtt", "down")
            await asyncio.sleep(1)
            await asyncio.to_thread(broker.start)
            await wait_for_health(platform, "mqtt", "up", timeout_s=60)
            await asyncio.to_thread(publishers.join)
            await _assert_exactly_once(pg_url)


async def _create_devices_via_platform(tmp_path: Any, env: dict[str, str]) -> list[Dev]:
    from iiot.app import Platform
    from iiot.config import load_settings

    quiet = {**env, "IIOT_MQTT_URL": "", "IIOT_HTTP_PORT": "0"}
    async with Platform(load_settings(quiet)) as platform:
        return await create_devices(platform, DEVICES)


async def _until(check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if await asyncio.to_thread(check):
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("condition not met in time")


async def test_platform_sigkill_mid_run(tmp_path, pg_url):
    with private_mosquitto(tmp_path) as broker:
        http_port = free_port()
        url = f"mqtt://127.0.0.1:{broker.port}?client_id=iiot-fault-kill"
        env = platform_env(
            tmp_path, IIOT_DATABASE_URL=pg_url, IIOT_MQTT_URL=url, IIOT_HTTP_PORT=str(http_port)
        )
        devices = await _create_devices_via_platform(tmp_path, env)
        with platform_process(env) as first:
            # The persistent session exists once the platform has subscribed.
            await _until(lambda: _subscribed(http_port), 30)
            publishers = Publishers(broker.port, devices)
            publishers.start()
            await _wait_rows_at_least(pg_url, POINTS // 4)
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        # While it is dead Mosquitto queues its messages in the persistent session.
        await asyncio.sleep(1)
        with platform_process(env):
            await _until(lambda: _subscribed(http_port), 30)
            await asyncio.to_thread(publishers.join)
            await _assert_exactly_once(pg_url)


def _subscribed(http_port: int) -> bool:
    import json

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=5) as answer:
        body = json.loads(answer.read() or b"{}")
    text = json.dumps(body)
    return '"mqtt"' in text and "subscribed to" in text


async def test_postgresql_unreachable_for_20_seconds_mid_run(tmp_path, pg_url):
    parts = urlsplit(pg_url)
    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        proxied = pg_url.replace(parts.netloc, f"{parts.username}@127.0.0.1:{proxy.port}")
        with private_mosquitto(tmp_path) as broker:
            url = f"mqtt://127.0.0.1:{broker.port}?client_id=iiot-fault-pg"
            env = platform_env(tmp_path, IIOT_DATABASE_URL=proxied, IIOT_MQTT_URL=url)
            async with running_platform(env) as platform:
                await wait_for_health(platform, "mqtt", "up")
                devices = await create_devices(platform, DEVICES)
                publishers = Publishers(broker.port, devices)
                publishers.start()
                await _wait_rows_at_least(pg_url, POINTS // 4)
                await proxy.outage(20)
                await asyncio.to_thread(publishers.join)
                await _assert_exactly_once(pg_url)
                assert platform.services.health.components["mqtt"].state == "up"
