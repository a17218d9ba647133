"""Split roles against one PostgreSQL: `iiot run --role api --workers 2` and `--role ingest`.

Real processes: data a device sends over MQTT to the ingest role is visible through the
API workers; every worker accepts the others' logins; the ingest role answers health
checks on its own port and serves no API; stopping the API command stops its workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt

from tests.e2e.api_helpers import api_platform
from tests.support import ADMIN_PASSWORD, free_port, platform_env, platform_process, wait_for_port

TS = 1_767_225_600_000


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


async def _workers(pid: int, count: int) -> list[int]:
    """The worker processes of the API command, once all have started (bounded wait)."""
    async with asyncio.timeout(60):
        while len(found := _children(pid)) < count:  # noqa: ASYNC110 - polls /proc
            await asyncio.sleep(0.1)
    assert len(found) == count
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its exit status is left to collect.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _publish(port: int, device_id: str, token: str, values: dict[str, Any]) -> None:
    """One QoS 1 message; returns once the broker's PUBACK (= stored) arrived."""
    connected = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"roles-{device_id}")
    client.username_pw_set(device_id, token)
    client.on_connect = lambda c, u, f, reason, p: reason == 0 and connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert connected.wait(15), "the ingest role's broker refused the device"
        info = client.publish(
            f"devices/{device_id}/telemetry", json.dumps({"ts": TS, "values": values}), qos=1
        )
        info.wait_for_publish(15)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


async def test_api_workers_and_ingest_role_share_one_database(pg_url: str, tmp_path: Path) -> None:
    api_port, ingest_port, mqtt_port = free_port(), free_port(), free_port()
    common = platform_env(tmp_path / "data", IIOT_DATABASE_URL=pg_url, IIOT_LOG_LEVEL="WARNING")
    api_env = {**common, "IIOT_HTTP_PORT": str(api_port)}
    ingest_env = {**common, "IIOT_HTTP_PORT": str(ingest_port), "IIOT_MQTT_PORT": str(mqtt_port)}
    api_base = f"http://127.0.0.1:{api_port}"

    # The API starts first: it creates the schema and the administrator.
    with platform_process(api_env, "--role", "api", "--workers", "2") as api:
        workers = await _workers(api.pid, 2)
        with platform_process(ingest_env, "--role", "ingest"):
            await asyncio.to_thread(wait_for_port, "127.0.0.1", mqtt_port)
            async with httpx.AsyncClient(base_url=api_base, timeout=30) as client:
                login = await client.post(
                    "/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
                )
                assert login.status_code == 200, login.text
                auth = {"Authorization": f"Bearer {login.json()['access_token']}"}
                tenant = await client.post("/api/tenants", json={"name": "acme"}, headers=auth)
                made = await client.post(
                    "/api/devices",
                    json={"name": "press-1", "tenant_id": tenant.json()["id"]},
                    headers=auth,
                )
                assert made.status_code == 201, made.text
                device_id, token = made.json()["id"], made.json()["token"]

                # MQTT to the ingest role; read back through the API workers.
                await asyncio.to_thread(
                    _publish, mqtt_port, device_id, token, {"temperature": 21.5}
                )
                latest = await client.get(
                    f"/api/devices/{device_id}/telemetry/latest", headers=auth
                )
                assert latest.json()["temperature"] == {"ts": TS, "value": 21.5}

            # Fresh connections are spread over the workers: every one of them accepts the
            # token and sees the same data.
            for _ in range(6):
                async with httpx.AsyncClient(base_url=api_base, timeout=30) as fresh:
                    answer = await fresh.get(f"/api/devices/{device_id}", headers=auth)
                    assert answer.status_code == 200
                    assert answer.json()["name"] == "press-1"

            # The ingest role serves health and metrics only.
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{ingest_port}", timeout=30
            ) as ingest:
                assert (await ingest.get("/healthz")).json() == {"status": "ok"}
                ready = (await ingest.get("/readyz")).json()
                assert ready["components"]["mqtt"]["state"] == "up"
                assert ready["components"]["database"]["state"] == "up"
                assert ready["components"]["livebridge"]["state"] == "up"
                assert "iiot_points_stored_total" in (await ingest.get("/metrics")).text
                assert (await ingest.get("/api/tenants", headers=auth)).status_code == 404

        # SIGTERM to the command stops every worker.
        api.send_signal(signal.SIGTERM)
        assert api.wait(timeout=60) == 0
    assert not any(_alive(pid) for pid in workers)


async def test_not_ready_until_every_component_has_started(tmp_path: Path) -> None:
    # The API answers while the components after it are still starting: a load balancer
    # must not send devices to a node whose live bridge or brokers are not up yet.
    async with api_platform(tmp_path) as api:
        ready = await api.ok("GET", "/readyz")
        assert "platform" not in ready["components"]
        api.platform.services.health.starting = True
        answer = await api.client.get("/readyz")
        assert answer.status_code == 503
        assert answer.json()["components"]["platform"]["state"] == "down"
        assert "starting" in answer.json()["components"]["platform"]["detail"]
