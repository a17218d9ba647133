"""Mosquitto secured with the generated password and ACL files: refusals, nothing stored."""

from __future__ import annotations

import asyncio
import contextlib
from uuid import UUID

import pytest

from iiot.adapters.mosquitto_security import acl_file, password_line
from tests.integration.test_mqtt_support import (
    BASE_TS,
    connect,
    create_devices,
    payload,
    private_mosquitto,
    wait_for_health,
)
from tests.support import platform_env, running_platform


async def test_wrong_password_and_foreign_topic_are_refused(tmp_path, pg_url):
    env = platform_env(tmp_path, IIOT_DATABASE_URL=pg_url)
    async with running_platform(env) as setup:  # devices first: their tokens go in the file
        [dev, victim] = await create_devices(setup, 2)
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    passwd.write_text(
        password_line("platform", "platform-secret")
        + password_line(dev.id, dev.token)
        + password_line(victim.id, victim.token)
    )
    acl.write_text(acl_file("platform"))
    security = f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n"
    with private_mosquitto(tmp_path, security) as broker:
        url = f"mqtt://platform:platform-secret@127.0.0.1:{broker.port}?client_id=iiot-sec"
        async with running_platform({**env, "IIOT_MQTT_URL": url}) as platform:
            await wait_for_health(platform, "mqtt", "up")
            with pytest.raises(PermissionError):
                await asyncio.to_thread(connect, broker.port, dev.id, "wrong", "bad")
            for topic, seq in (
                (f"devices/{victim.id}/telemetry", 1),
                (f"devices/{dev.id}/telemetry", 2),
            ):
                client = await asyncio.to_thread(connect, broker.port, dev.id, dev.token, "dev")
                try:
                    info = client.publish(topic, payload(seq), qos=1)
                    # Mosquitto drops a forbidden message (acked or by disconnecting the client).
                    with contextlib.suppress(RuntimeError):
                        await asyncio.to_thread(info.wait_for_publish, 10)
                finally:
                    client.disconnect()
                    client.loop_stop()
            store = platform.services.store
            for _ in range(200):
                if await store.latest(None, UUID(dev.id)):
                    break
                await asyncio.sleep(0.05)
            assert (await store.latest(None, UUID(dev.id)))["pressure"].ts == BASE_TS + 2
            assert await store.latest(None, UUID(victim.id)) == {}
