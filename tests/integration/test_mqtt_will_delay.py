"""Will messages of the embedded MQTT endpoint with paho's MQTT 5 client: the Will Delay
Interval, its interplay with the session (expiry, Clean Start, takeover) and 3.1.1 wills.

A will here is a telemetry message, so "published" means its point is in the store."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any
from uuid import UUID

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from iiot.adapters.mqtt_server import MqttServer
from iiot.app import Platform
from tests.integration.test_mqtt_support import BASE_TS, Dev, create_devices
from tests.support import free_port, platform_env, running_platform

TOPIC = "v1/devices/me/telemetry"
WILL = json.dumps({"ts": BASE_TS, "values": {"online": False}}).encode()


@pytest.fixture
def port() -> int:
    return free_port()


def _open(
    port: int,
    dev: Dev,
    client_id: str,
    *,
    will_delay: int | None = None,
    session_expiry: int = 60,
    clean_start: bool = True,
    version: int = paho.MQTTv5,
) -> tuple[paho.Client, bool]:
    """A connected paho client with a will (when `will_delay` is given) and its network loop
    running; also whether the endpoint found a session (CONNACK session present)."""
    v5 = version == paho.MQTTv5
    kwargs: dict[str, Any] = {} if v5 else {"clean_session": clean_start}
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=version,
        **kwargs,
    )
    client.username_pw_set(dev.token)  # ThingsBoard form: the token as username
    if will_delay is not None:
        will_props = None
        if v5:
            will_props = Properties(PacketTypes.WILLMESSAGE)
            will_props.WillDelayInterval = will_delay
        client.will_set(TOPIC, WILL, qos=1, properties=will_props)
    result: dict[str, Any] = {}
    done = threading.Event()

    def on_connect(c: paho.Client, u: Any, flags: Any, reason: Any, p: Any) -> None:
        result["reason"], result["present"] = reason, flags.session_present
        done.set()

    client.on_connect = on_connect
    if v5:
        props = Properties(PacketTypes.CONNECT)
        if session_expiry:
            props.SessionExpiryInterval = session_expiry
        client.connect("127.0.0.1", port, keepalive=30, clean_start=clean_start, properties=props)
    else:
        client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    if not done.wait(10):
        client.loop_stop()
        raise TimeoutError("no CONNACK")
    assert not result["reason"].is_failure, result["reason"]
    return client, bool(result["present"])


async def connect(port: int, dev: Dev, client_id: str, **kw: Any) -> tuple[paho.Client, bool]:
    return await asyncio.to_thread(_open, port, dev, client_id, **kw)


def drop(client: paho.Client) -> None:
    """The device vanishes: the socket closes without DISCONNECT."""
    client.loop_stop()  # no reconnection, no DISCONNECT
    sock = client.socket()
    assert sock is not None
    sock.close()


def _server(platform: Platform) -> MqttServer:
    return next(c for c in platform.components if isinstance(c, MqttServer))


async def _will_stored(platform: Platform, dev: Dev) -> bool:
    latest = await platform.services.store.latest(None, UUID(dev.id))
    return "online" in latest


async def wait_for_will(
    platform: Platform, dev: Dev, timeout_s: float, since: float | None = None
) -> float:
    """Seconds from `since` (default: now) until the will's point is stored (fails when it
    is not within `timeout_s`)."""
    start = time.monotonic()
    while not await _will_stored(platform, dev):
        assert time.monotonic() - start < timeout_s, "the will was not published"
        await asyncio.sleep(0.05)
    return time.monotonic() - (start if since is None else since)


async def test_will_waits_for_its_delay(tmp_path, port):
    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        [dev] = await create_devices(platform, 1)
        client, _ = await connect(port, dev, "sensor", will_delay=2)
        dropped = time.monotonic()
        drop(client)
        await asyncio.sleep(1.0)
        assert not await _will_stored(platform, dev)  # 1 s after the drop: still held back
        assert await wait_for_will(platform, dev, timeout_s=5, since=dropped) >= 2.0
        assert len(_server(platform).wills) == 0


@pytest.mark.parametrize("first_clean", [False, True])
async def test_reconnecting_within_the_delay_suppresses_the_will(tmp_path, port, first_clean):
    # paho's default is Clean Start on the first connection only: its session (expiry 60 s)
    # is the one the reconnection continues, as much as one started with Clean Start 0.
    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        [dev] = await create_devices(platform, 1)
        client, _ = await connect(port, dev, "sensor", will_delay=2, clean_start=first_clean)
        drop(client)
        await asyncio.sleep(0.5)
        again, present = await connect(port, dev, "sensor", clean_start=False)
        assert present  # a session with an expiry is kept, however it started
        await asyncio.sleep(2.5)  # past the delay of the will
        assert not await _will_stored(platform, dev)
        again.disconnect()
        again.loop_stop()
        await asyncio.sleep(0.5)  # a normal DISCONNECT: no will either
        assert not await _will_stored(platform, dev)


async def test_reconnecting_with_clean_start_ends_the_session_and_publishes_the_will(
    tmp_path, port
):
    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        [dev] = await create_devices(platform, 1)
        client, _ = await connect(port, dev, "sensor", will_delay=30)
        drop(client)
        await asyncio.sleep(0.3)
        assert not await _will_stored(platform, dev)
        again, present = await connect(port, dev, "sensor", clean_start=True)
        assert not present
        assert await wait_for_will(platform, dev, timeout_s=5) < 5  # not 30 s
        again.disconnect()
        again.loop_stop()


async def test_another_device_with_the_same_client_id_does_not_cancel_the_will(tmp_path, port):
    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        [dev, other] = await create_devices(platform, 2)
        client, _ = await connect(port, dev, "shared-name", will_delay=2)
        drop(client)
        await asyncio.sleep(0.3)
        intruder, present = await connect(port, other, "shared-name", clean_start=False)
        assert not present
        await wait_for_will(platform, dev, timeout_s=5)
        intruder.disconnect()
        intruder.loop_stop()


async def test_a_shorter_session_expiry_cuts_the_delay_short(tmp_path, port):
    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        [first, second] = await create_devices(platform, 2)
        # Session expiry 1 s, will delay 30 s: the session ends first, and the will goes out.
        client, _ = await connect(port, first, "short", will_delay=30, session_expiry=1)
        dropped = time.monotonic()
        drop(client)
        assert 1.0 <= await wait_for_will(platform, first, timeout_s=5, since=dropped) < 5
        # No session expiry: the session ends with the connection, the will goes out at once.
        client, _ = await connect(port, second, "none", will_delay=30, session_expiry=0)
        drop(client)
        assert await wait_for_will(platform, second, timeout_s=5) < 1.5


async def test_disconnect_with_will_message_waits_for_the_delay_too(tmp_path, port):
    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        [dev] = await create_devices(platform, 1)
        client, _ = await connect(port, dev, "leaver", will_delay=1)
        left = time.monotonic()
        client.disconnect(
            reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
        )
        client.loop_stop()
        await asyncio.sleep(0.5)
        assert not await _will_stored(platform, dev)
        assert 1.0 <= await wait_for_will(platform, dev, timeout_s=5, since=left) < 5


async def test_session_expiry_given_at_disconnect_is_the_wills_deadline(tmp_path, port):
    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        [ending, refused] = await create_devices(platform, 2)
        with_will = ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
        # Leaving with Session Expiry 0: the session ends now, and so the will's delay.
        client, _ = await connect(port, ending, "ending", will_delay=30, session_expiry=60)
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 0
        client.disconnect(reasoncode=with_will, properties=props)
        client.loop_stop()
        assert await wait_for_will(platform, ending, timeout_s=5) < 1.5
        # A session that was to end with the connection cannot be prolonged at DISCONNECT:
        # a protocol error, so not a valid DISCONNECT, and the will goes out at once.
        client, _ = await connect(port, refused, "prolong", will_delay=30, session_expiry=0)
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 60
        client.disconnect(properties=props)  # normal disconnection, were it valid: no will
        client.loop_stop()
        assert await wait_for_will(platform, refused, timeout_s=5) < 1.5
        assert len(_server(platform).wills) == 0


async def test_takeover_of_an_open_connection_follows_the_session(tmp_path, port):
    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        [kept, ended] = await create_devices(platform, 2)
        # The old connection is still open (half-open: the device moved to a new one).
        old, _ = await connect(port, kept, "mover", will_delay=1, clean_start=False)
        old.loop_stop()
        new, present = await connect(port, kept, "mover", clean_start=False)
        assert present
        await asyncio.sleep(2.0)  # the session went on: no will, now or after its delay
        assert not await _will_stored(platform, kept)
        # Taken over with Clean Start: the old session ends, its will is published.
        old2, _ = await connect(port, ended, "mover2", will_delay=30)
        old2.loop_stop()
        new2, present = await connect(port, ended, "mover2", clean_start=True)
        assert not present
        assert await wait_for_will(platform, ended, timeout_s=5) < 5
        for client in (new, new2):
            client.disconnect()
            client.loop_stop()


async def test_mqtt311_will_is_published_at_once(tmp_path, port):
    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        [dev] = await create_devices(platform, 1)
        client, _ = await connect(port, dev, "old-timer", will_delay=0, version=paho.MQTTv311)
        drop(client)
        assert await wait_for_will(platform, dev, timeout_s=5) < 1.5


async def test_pending_wills_are_published_when_the_endpoint_stops(tmp_path, port):
    env = platform_env(tmp_path, IIOT_MQTT_PORT=str(port))
    async with running_platform(env) as platform:
        [dev] = await create_devices(platform, 1)
        client, _ = await connect(port, dev, "sensor", will_delay=600)
        drop(client)
        await asyncio.sleep(0.3)
        assert not await _will_stored(platform, dev)
        assert len(_server(platform).wills) == 1
    async with running_platform(env) as platform:  # the will was stored at the stop
        assert await _will_stored(platform, dev)
