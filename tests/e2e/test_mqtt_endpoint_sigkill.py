"""`mosquitto_pub` into the embedded endpoint with the platform SIGKILLed midway: after a
restart the device sends again and every line is stored exactly once in PostgreSQL."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import pytest

from tests.amqp_support import make_devices
from tests.integration.test_mqtt_support import (
    Dev,
    mosquitto_pub_lines,
    payload,
    telemetry_counts,
    wait_for_rows,
)
from tests.support import free_port, platform_env, platform_process

pytestmark = pytest.mark.postgres

LINES = 10_000


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
async def test_sigkill_midway_then_resend_stores_each_line_once(
    tmp_path: Path, pg_url: str, version: str
) -> None:
    [made] = await make_devices(pg_url, 1)
    dev = Dev(str(made.id), made.token)
    mqtt_port, http_port = free_port(), free_port()
    env = platform_env(
        tmp_path,
        IIOT_DATABASE_URL=pg_url,
        IIOT_MQTT_PORT=str(mqtt_port),
        IIOT_HTTP_PORT=str(http_port),
    )
    username, password = (dev.token, None) if version == "mqttv5" else (dev.id, dev.token)
    lines = b"\n".join(payload(seq) for seq in range(LINES)) + b"\n"
    command = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(mqtt_port), "-q", "1"]
    command += ["-V", version, "-i", "killed", "-l", "-t", f"devices/{dev.id}/telemetry"]
    command += ["-u", username] + (["-P", password] if password else [])
    with platform_process(env) as proc:
        first = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)  # noqa: ASYNC220 (starts at once, runs beside the platform)
        assert first.stdin is not None
        first.stdin.write(lines)
        first.stdin.close()
        await wait_for_rows(pg_url, 3 * 1000, timeout_s=60)
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 30)
    # mosquitto_pub keeps trying to reconnect to the dead platform: stop it.
    finished = first.poll() == 0
    first.kill()
    first.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = (await telemetry_counts(pg_url))[0]
    if finished:
        pytest.skip("the publisher finished before the kill: nothing was interrupted")
    assert killed_at < 3 * LINES
    # The device did not get every PUBACK: it sends everything again after the restart.
    with platform_process(env) as proc:
        again = await asyncio.to_thread(
            mosquitto_pub_lines, mqtt_port, dev, LINES, username, password, version
        )
        assert again.returncode == 0, again.stderr
        rows = await wait_for_rows(pg_url, 3 * LINES, timeout_s=60)
    assert (rows, (await telemetry_counts(pg_url))[1]) == (3 * LINES, 3 * LINES)
