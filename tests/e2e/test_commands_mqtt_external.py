"""Commands and attributes through an external Mosquitto (`IIOT_MQTT_URL`), our topics:
a paho device answers commands and receives shared attributes."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from tests.e2e.api_helpers import api_platform
from tests.integration.test_mqtt_support import connect, private_mosquitto


async def test_paho_device_through_external_broker(tmp_path: Path, pg_url: str) -> None:
    with private_mosquitto(tmp_path) as broker:
        url = f"mqtt://127.0.0.1:{broker.port}"
        async with api_platform(tmp_path, IIOT_DATABASE_URL=pg_url, IIOT_MQTT_URL=url) as api:
            tenant = await api.tenant("plant")
            device = await api.device(api.admin, "pump", tenant_id=tenant["id"])
            did = device["id"]
            shared: list[Any] = []
            got_shared = threading.Event()
            client = connect(broker.port, None, None, f"device-{did}")
            try:

                def on_message(c: paho.Client, u: Any, message: paho.MQTTMessage) -> None:
                    if message.topic == f"devices/{did}/attributes/shared":
                        shared.append(json.loads(message.payload))
                        got_shared.set()
                        return
                    command = json.loads(message.payload)
                    answer = {"echo": command["method"], "params": command["params"]}
                    c.publish(message.topic + "/reply", json.dumps(answer), qos=1)

                client.on_message = on_message
                subscribed = threading.Event()
                client.on_subscribe = lambda *args: subscribed.set()
                client.subscribe(
                    [(f"devices/{did}/commands/+", 1), (f"devices/{did}/attributes/shared", 1)]
                )
                assert await asyncio.to_thread(subscribed.wait, 10)

                answer = await api.ok(
                    "POST",
                    f"/api/devices/{did}/commands",
                    json={"method": "setValve", "params": {"open": True}},
                    headers=api.admin,
                )
                assert answer["status"] == "SUCCESSFUL"
                assert answer["response"] == {"echo": "setValve", "params": {"open": True}}

                await api.ok(
                    "PUT",
                    f"/api/devices/{did}/attributes/shared",
                    204,
                    json={"interval": 30},
                    headers=api.admin,
                )
                assert await asyncio.to_thread(got_shared.wait, 10)
                assert shared == [{"interval": 30}]

                client.publish(f"devices/{did}/attributes", json.dumps({"fw": "2.0"}), qos=1)
                for _ in range(100):
                    attrs = await api.ok("GET", f"/api/devices/{did}/attributes", headers=api.admin)
                    if "fw" in attrs["client"]:
                        break
                    await asyncio.sleep(0.05)
                assert attrs["client"]["fw"]["value"] == "2.0"
            finally:
                client.loop_stop()
                client.disconnect()
