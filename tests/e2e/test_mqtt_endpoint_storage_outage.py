"""The platform's own MQTT endpoint while PostgreSQL is unreachable: no PUBACK before the
points are stored, then every message stored exactly once when the database is back.

The pipeline gives up on a commit after `IIOT_COMMIT_TIMEOUT_S`; the endpoint then keeps the
PUBACK back and retries the message itself until storage answers again.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

from tests.integration.test_mqtt_support import (
    close_client,
    connect,
    create_devices,
    payload,
    telemetry_counts,
    wait_for_rows,
)
from tests.support import free_port, platform_env, running_platform
from tests.tcp_proxy import TcpProxy

MESSAGES = 20


async def test_no_puback_while_storage_is_away_then_each_message_stored_once(
    tmp_path, pg_url
) -> None:
    parts = urlsplit(pg_url)
    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        proxied = pg_url.replace(parts.netloc, f"{parts.username}@127.0.0.1:{proxy.port}")
        port = free_port()
        env = platform_env(
            tmp_path,
            IIOT_DATABASE_URL=proxied,
            IIOT_MQTT_PORT=str(port),
            IIOT_COMMIT_TIMEOUT_S="1",
        )
        async with running_platform(env) as platform:
            [dev] = await create_devices(platform, 1)
            client = await asyncio.to_thread(connect, port, dev.id, dev.token, "outage")
            try:
                proxy.refusing = True
                proxy.cut()
                infos = [
                    client.publish(f"devices/{dev.id}/telemetry", payload(seq), qos=1)
                    for seq in range(MESSAGES)
                ]
                # Past the commit timeout, so the endpoint's own retry is what holds them.
                await asyncio.sleep(3)
                assert not any(info.is_published() for info in infos)
                proxy.refusing = False
                deadline = time.monotonic() + 60
                while not all(info.is_published() for info in infos):
                    assert time.monotonic() < deadline, "PUBACKs never came after the outage"
                    await asyncio.sleep(0.1)
            finally:
                await close_client(client)
            assert await wait_for_rows(pg_url, MESSAGES * 3, timeout_s=10) == MESSAGES * 3
            assert await telemetry_counts(pg_url) == (MESSAGES * 3, MESSAGES * 3)
