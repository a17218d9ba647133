"""The platform's MQTT client over TLS (`mqtts://`), and shared subscriptions that split
the load between platform processes, against private Mosquitto brokers."""

from __future__ import annotations

import asyncio

from tests.integration.test_mqtt_support import (
    create_devices,
    private_mosquitto,
    publish_all,
    telemetry_counts,
    unacked_messages,
    wait_for_health,
    wait_for_rows,
)
from tests.support import free_port, platform_env, running_platform, self_signed_certificate


async def test_platform_subscribes_over_tls_with_its_own_ca(tmp_path, pg_url):
    cert, key = self_signed_certificate(tmp_path)
    plain = free_port()
    # The first listener (the platform's) speaks TLS; devices use a plain one here.
    tls = f"certfile {cert}\nkeyfile {key}\nallow_anonymous true\nlistener {plain} 127.0.0.1\n"
    with private_mosquitto(tmp_path, tls) as broker:
        url = f"mqtts://127.0.0.1:{broker.port}?ca={cert}&client_id=iiot-tls-test"
        env = platform_env(tmp_path, IIOT_DATABASE_URL=pg_url, IIOT_MQTT_URL=url)
        async with running_platform(env) as platform:
            await wait_for_health(platform, "mqtt", "up")
            devices = await create_devices(platform, 4)
            await asyncio.to_thread(publish_all, plain, devices, 100)
            assert await wait_for_rows(pg_url, 1_200) == 1_200
        assert await asyncio.to_thread(unacked_messages, "127.0.0.1", plain, "iiot-tls-test") == 0

        # Without the broker's CA the platform refuses the connection and says so.
        untrusted = f"mqtts://127.0.0.1:{broker.port}?client_id=iiot-tls-untrusted"
        env = platform_env(tmp_path / "b", IIOT_DATABASE_URL=pg_url, IIOT_MQTT_URL=untrusted)
        async with running_platform(env) as platform:
            await asyncio.sleep(1.5)
            health = platform.services.health.components["mqtt"]
            assert health.state == "down" and "CERTIFICATE_VERIFY_FAILED" in health.detail


async def test_a_shared_group_splits_the_messages_between_platform_processes(tmp_path, pg_url):
    with private_mosquitto(tmp_path) as broker:
        url = f"mqtt://127.0.0.1:{broker.port}"
        env = {"IIOT_DATABASE_URL": pg_url, "IIOT_MQTT_URL": url, "IIOT_MQTT_SHARED_GROUP": "g"}
        # Two platforms with their own data directories: two sessions in one group.
        async with (
            running_platform(platform_env(tmp_path / "one", **env)) as one,
            running_platform(platform_env(tmp_path / "two", **env)) as two,
        ):
            assert one.services.settings.data_dir != two.services.settings.data_dir
            await wait_for_health(one, "mqtt", "up")
            await wait_for_health(two, "mqtt", "up")
            devices = await create_devices(one, 10)
            await asyncio.to_thread(publish_all, broker.port, devices, 200)
            assert await wait_for_rows(pg_url, 6_000) == 6_000
            assert await telemetry_counts(pg_url) == (6_000, 6_000)
            shares = [
                p.services.metrics.points_stored.labels("mqtt")._value.get() for p in (one, two)
            ]
    # Each message went to one member of the group: both took part, none twice.
    assert sum(shares) == 6_000 and min(shares) > 0, shares
