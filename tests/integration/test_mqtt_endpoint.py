"""The embedded MQTT endpoint at the packet level: versions, refusals, limits, fuzzed frames,
takeover, persistent sessions and the way back to devices (links and inbox)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID, uuid4

import pytest

from iiot.adapters import mqtt_codec as mc
from iiot.links import OutboundCommand
from iiot.model import Device
from tests.integration.test_mqtt_support import BASE_TS, create_devices, payload
from tests.support import free_port, platform_env, running_platform

LOGGER = "iiot.adapters.mqtt_server"


def _metric(platform: Any, line_start: str) -> float:
    for line in platform.services.metrics.render().decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _refused(platform: Any, reason: str) -> float:
    return _metric(platform, f'iiot_messages_refused_total{{protocol="mqtt",reason="{reason}"}}')


class Raw:
    """A bare MQTT client on the codec: sends exactly what a test says."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, version: int):
        self.reader, self.writer = reader, writer
        self.decoder = mc.Reader(1 << 24, version)
        self.version = version
        self.packets: list[Any] = []

    @classmethod
    async def open(cls, port: int, version: int = mc.V5) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, version)

    async def connect(
        self, username: str | None, password: str | None = None, client_id: str = "", **kw: Any
    ) -> mc.ConnAck:
        packet = mc.Connect(
            self.version,
            client_id,
            username=username,
            password=password.encode() if password else None,
            **kw,
        )
        self.send(mc.encode_connect(packet))
        ack = await self.next()
        assert isinstance(ack, mc.ConnAck)
        return ack

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def next(self, timeout_s: float = 10.0) -> Any:
        """The next packet; None when the server closed the connection."""
        while not self.packets:
            data = await asyncio.wait_for(self.reader.read(65536), timeout_s)
            if not data:
                return None
            self.packets.extend(self.decoder.feed(data))
        return self.packets.pop(0)

    async def closed(self, timeout_s: float = 10.0) -> list[Any]:
        """Every packet until the server closes the connection."""
        seen = []
        while (packet := await self.next(timeout_s)) is not None:
            seen.append(packet)
        return seen

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
def port() -> int:
    return free_port()


async def test_both_versions_and_both_username_forms_store_telemetry(tmp_path, port):
    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        [dev] = await create_devices(platform, 1)
        for seq, (version, username, password, topic) in enumerate(
            [
                (mc.V311, dev.id, dev.token, f"devices/{dev.id}/telemetry"),
                (mc.V311, dev.token, None, "v1/devices/me/telemetry"),
                (mc.V5, dev.id, dev.token, "v1/devices/me/telemetry"),
                (mc.V5, dev.token, None, f"devices/{dev.id}/telemetry"),
            ]
        ):
            client = await Raw.open(port, version)
            ack = await client.connect(username, password, client_id=f"c{seq}")
            assert ack.code == 0
            if version == mc.V5:
                assert ack.properties[mc.MAXIMUM_QOS] == 1
                assert ack.properties[mc.MAXIMUM_PACKET_SIZE] >= 256 * 1024
                assert ack.properties[mc.RECEIVE_MAXIMUM] > 0
            client.send(mc.encode_publish(version, topic, payload(seq), 1, 1))
            assert await client.next() == mc.PubAck(1, 0)
            client.send(mc.encode_publish(version, topic, b"{}", 1, 2))  # empty: acked, no rows
            assert await client.next() == mc.PubAck(2, 0)
            latest = await platform.services.store.latest(None, UUID(dev.id))
            assert latest["pressure"].ts == BASE_TS + seq
            client.close()


async def test_refused_logins_do_not_disturb_a_connected_device(tmp_path, port, caplog):
    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        [dev, other] = await create_devices(platform, 2)
        good = await Raw.open(port)
        assert (await good.connect(dev.id, dev.token, client_id="shared-id")).code == 0
        caplog.set_level(logging.INFO, logger=LOGGER)
        cases = [
            (mc.V5, dev.id, "wrong", "x1", 0x87),
            (mc.V5, None, None, "x2", 0x86),
            (mc.V5, "not-a-token", None, "x3", 0x87),
            (mc.V311, dev.id, other.token, "x4", 0x05),
            (mc.V311, None, None, "x5", 0x04),
            # The same client id as the connected device, logged in as another device.
            (mc.V5, other.id, other.token, "shared-id", 0x85),
        ]
        for version, username, password, client_id, code in cases:
            client = await Raw.open(port, version)
            ack = await client.connect(username, password, client_id=client_id)
            assert ack.code == code
            assert await client.closed() == []
        assert _metric(platform, 'iiot_auth_failures_total{protocol="mqtt"}') == 5
        assert _refused(platform, "client_id_taken") == 1
        assert any("login refused" in r.getMessage() for r in caplog.records)
        # The connected device never noticed.
        good.send(mc.encode_publish(mc.V5, f"devices/{dev.id}/telemetry", payload(1), 1, 9))
        assert await good.next() == mc.PubAck(9, 0)
        # The same device taking over its client id closes the older connection.
        again = await Raw.open(port)
        assert (await again.connect(dev.token, None, client_id="shared-id")).code == 0
        assert await good.closed() == [mc.Disconnect(0x8E, {})]
        again.close()


async def test_unsupported_levels_and_qos2_are_refused(tmp_path, port):
    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        [dev] = await create_devices(platform, 1)
        for level, answer in [(3, mc.ConnAck(False, 0x01, {})), (6, mc.ConnAck(False, 0x84, {}))]:
            client = await Raw.open(port, mc.V5 if level > 5 else mc.V311)
            name = "MQIsdp" if level == 3 else "MQTT"
            client.send(mc.encode_connect(mc.Connect(level, "c", protocol_name=name)))
            assert await client.closed() == [answer]
        assert _refused(platform, "protocol_version") == 2
        client = await Raw.open(port)
        await client.connect(dev.token)
        client.send(mc.encode_publish(mc.V5, "v1/devices/me/telemetry", payload(1), 2, 1))
        assert await client.closed() == [mc.Disconnect(0x9B, {})]
        client = await Raw.open(port, mc.V311)
        await client.connect(dev.token)
        client.send(mc.encode_subscribe(mc.V311, 3, [("v1/devices/me/rpc/request/+", 2)]))
        assert await client.next() == mc.SubAck(3, [1])  # QoS 2 granted as 1
        client.send(mc.encode_publish(mc.V311, "v1/devices/me/telemetry", payload(1), 2, 1))
        assert await client.closed() == []
        assert _refused(platform, "qos2") == 2


async def test_v5_foreign_topic_gets_reason_code_and_connection_stays(tmp_path, port, caplog):
    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        [dev, victim] = await create_devices(platform, 2)
        client = await Raw.open(port)
        await client.connect(dev.token)
        caplog.set_level(logging.INFO, logger=LOGGER)
        for pid, topic in enumerate(
            [f"devices/{victim.id}/telemetry", "v1/gateway/telemetry", "anything"], start=1
        ):
            client.send(mc.encode_publish(mc.V5, topic, payload(1), 1, pid))
            assert await client.next() == mc.PubAck(pid, 0x87)
        client.send(mc.encode_subscribe(mc.V5, 7, [(f"devices/{victim.id}/commands/+", 1)]))
        assert await client.next() == mc.SubAck(7, [0x87])
        client.send(mc.encode_publish(mc.V5, f"devices/{dev.id}/telemetry", payload(2), 1, 8))
        assert await client.next() == mc.PubAck(8, 0)
        assert _refused(platform, "forbidden_topic") == 3
        assert _refused(platform, "forbidden_subscription") == 1
        assert await platform.services.store.latest(None, UUID(victim.id)) == {}
        assert any("may not publish to" in r.getMessage() for r in caplog.records)


async def test_oversize_packet_closes_the_connection(tmp_path, port, caplog):
    env = platform_env(tmp_path, IIOT_MQTT_PORT=str(port), IIOT_MAX_MESSAGE_BYTES="2000")
    async with running_platform(env) as platform:
        [dev] = await create_devices(platform, 1)
        caplog.set_level(logging.INFO, logger=LOGGER)
        for version in (mc.V5, mc.V311):
            client = await Raw.open(port, version)
            ack = await client.connect(dev.token)
            if version == mc.V5:
                assert ack.properties[mc.MAXIMUM_PACKET_SIZE] == 2000 + 1024
            big = b'{"blob":"' + b"x" * 5000 + b'"}'
            client.send(mc.encode_publish(version, "v1/devices/me/telemetry", big, 1, 1))
            expected = [mc.Disconnect(0x95, {})] if version == mc.V5 else []
            assert await client.closed() == expected
        assert _refused(platform, "too_large") == 2
        assert any("the maximum is 3024" in r.getMessage() for r in caplog.records)


async def test_fuzzed_frames_close_cleanly_and_others_keep_being_served(tmp_path, port, caplog):
    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        [dev] = await create_devices(platform, 1)
        good = await Raw.open(port)
        await good.connect(dev.token, client_id="good")
        server = next(c for c in platform.components if c.name == "mqtt")
        rng = random.Random(10)
        valid = mc.encode_connect(mc.Connect(mc.V5, "f", username=dev.token))
        frames = [os.urandom(rng.randint(1, 200)) for _ in range(100)]
        frames += [valid[: rng.randint(1, len(valid) - 1)] for _ in range(30)]  # truncated
        frames += [valid + os.urandom(rng.randint(1, 50)) for _ in range(60)]  # garbage after
        frames += [b"\x10\xff\xff\xff\xff\x01"]  # remaining length of 5 bytes
        caplog.set_level(logging.INFO, logger=LOGGER)
        for index, frame in enumerate(frames):
            client = await Raw.open(port)
            client.send(frame)
            # A frame cut short waits for the rest until the connection ends (or the
            # keep-alive runs out), as any slow sender would.
            client.writer.write_eof()
            with contextlib.suppress(ConnectionResetError):
                await client.closed(timeout_s=15)
            client.close()
            good.send(mc.encode_publish(mc.V5, "v1/devices/me/telemetry", payload(index), 1, 1))
            assert await good.next() == mc.PubAck(1, 0)
        for _ in range(100):
            if len(server.connections) == 1:
                break
            await asyncio.sleep(0.05)
        assert len(server.connections) == 1  # only the good one: nothing left behind
        assert _refused(platform, "malformed") > 0
        assert any("malformed packet" in r.getMessage() for r in caplog.records)


async def test_keepalive_is_enforced(tmp_path, port):
    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        [dev] = await create_devices(platform, 1)
        client = await Raw.open(port)
        await client.connect(dev.token, keepalive=1)
        assert await client.closed(timeout_s=20) == [mc.Disconnect(0x8D, {})]
        assert _refused(platform, "keepalive") == 1


class FakeInbox:
    """What the command and attribute services would do, in memory."""

    def __init__(self) -> None:
        self.replies: list[tuple[UUID, UUID, Any]] = []
        self.attributes: list[tuple[UUID, dict[str, Any]]] = []

    async def command_reply(self, device: Device, command_id: UUID, response: Any) -> None:
        self.replies.append((device.id, command_id, response))

    async def report_attributes(self, device: Device, values: Mapping[str, Any]) -> None:
        self.attributes.append((device.id, dict(values)))

    async def request_attributes(
        self, device: Device, client_keys: Sequence[str] | None, shared_keys: Sequence[str] | None
    ) -> dict[str, dict[str, Any]]:
        return {"client": {k: 1 for k in client_keys or []}, "shared": {"mode": "auto"}}

    async def client_rpc(self, device: Device, method: str, params: Any) -> Any:
        if method == "getTime":
            return {"time": 1}
        raise LookupError(method)


async def test_commands_attributes_and_replies_over_both_families(tmp_path, port):
    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        [dev] = await create_devices(platform, 1)
        services = platform.services
        inbox = FakeInbox()
        services.inbox = inbox
        device_id = UUID(dev.id)
        # Ours.
        client = await Raw.open(port)
        await client.connect(dev.token)
        client.send(mc.encode_subscribe(mc.V5, 1, [(f"devices/{dev.id}/commands/+", 1)]))
        assert await client.next() == mc.SubAck(1, [1])
        [link] = services.links.links(device_id)
        assert link.listens_commands and not link.listens_attributes
        command = OutboundCommand(uuid4(), "reboot", {"delay": 1})
        delivery = asyncio.ensure_future(link.deliver_command(command))
        publish = await client.next()
        assert publish.topic == f"devices/{dev.id}/commands/{command.id}"
        assert json.loads(publish.payload) == {"method": "reboot", "params": {"delay": 1}}
        assert not delivery.done()  # True only after the device's PUBACK
        client.send(mc.encode_puback(mc.V5, publish.packet_id))
        assert await delivery is True
        reply_topic = f"devices/{dev.id}/commands/{command.id}/reply"
        client.send(mc.encode_publish(mc.V5, reply_topic, b'{"ok":true}', 1, 2))
        assert await client.next() == mc.PubAck(2, 0)
        assert inbox.replies == [(device_id, command.id, {"ok": True})]
        client.send(mc.encode_unsubscribe(mc.V5, 3, [f"devices/{dev.id}/commands/+"]))
        assert isinstance(await client.next(), mc.UnsubAck)
        # Still connected (its link stays while the connection is open), listening to nothing.
        [link] = services.links.links(device_id)
        assert not link.listens_commands and not link.listens_attributes
        client.close()
        for _ in range(100):  # the server notices the close and detaches the link
            if not services.links.links(device_id):
                break
            await asyncio.sleep(0.05)
        assert services.links.links(device_id) == []
        # ThingsBoard's device API.
        client = await Raw.open(port, mc.V311)
        await client.connect(dev.token)
        client.send(
            mc.encode_subscribe(
                mc.V311, 1, [("v1/devices/me/rpc/request/+", 1), ("v1/devices/me/attributes", 0)]
            )
        )
        assert await client.next() == mc.SubAck(1, [1, 0])
        [link] = services.links.links(device_id)
        assert link.listens_commands and link.listens_attributes
        command = OutboundCommand(uuid4(), "setGpio", {"pin": 2})
        delivery = asyncio.ensure_future(link.deliver_command(command))
        publish = await client.next()
        assert publish.topic == "v1/devices/me/rpc/request/1"
        client.send(mc.encode_puback(mc.V311, publish.packet_id))
        assert await delivery is True
        client.send(mc.encode_publish(mc.V311, "v1/devices/me/rpc/response/1", b'"done"', 1, 5))
        assert await client.next() == mc.PubAck(5, 0)
        assert inbox.replies[-1] == (device_id, command.id, "done")
        await link.deliver_attributes({"mode": "eco"}, ["old"])
        update = await client.next()
        assert update.topic == "v1/devices/me/attributes" and update.qos == 0
        assert json.loads(update.payload) == {"mode": "eco", "deleted": ["old"]}
        client.send(mc.encode_publish(mc.V311, "v1/devices/me/attributes", b'{"fw":"1.2"}', 1, 6))
        assert await client.next() == mc.PubAck(6, 0)
        assert inbox.attributes == [(device_id, {"fw": "1.2"})]
        request = b'{"clientKeys":"fw","sharedKeys":"mode"}'
        client.send(mc.encode_publish(mc.V311, "v1/devices/me/attributes/request/4", request, 1, 7))
        answer, ack = await client.next(), await client.next()
        assert ack == mc.PubAck(7, 0)
        assert answer.topic == "v1/devices/me/attributes/response/4"
        assert json.loads(answer.payload) == {"client": {"fw": 1}, "shared": {"mode": "auto"}}
        for request_id, method, expected in [
            (8, "getTime", {"time": 1}),
            (9, "nope", {"error": "'nope'"}),
        ]:
            body = json.dumps({"method": method, "params": {}}).encode()
            topic = f"v1/devices/me/rpc/request/{request_id}"
            client.send(mc.encode_publish(mc.V311, topic, body, 1, request_id))
            answer, ack = await client.next(), await client.next()
            assert answer.topic == f"v1/devices/me/rpc/response/{request_id}"
            if method == "getTime":
                assert json.loads(answer.payload) == expected
            else:
                assert "error" in json.loads(answer.payload)
        client.close()
        for _ in range(100):
            if not services.links.links(device_id):
                break
            await asyncio.sleep(0.02)
        assert services.links.links(device_id) == []


async def test_qos0_subscription_delivers_without_confirmation(tmp_path, port):
    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        [dev] = await create_devices(platform, 1)
        client = await Raw.open(port)
        await client.connect(dev.token)
        client.send(mc.encode_subscribe(mc.V5, 1, [("v1/devices/me/rpc/request/+", 0)]))
        await client.next()
        [link] = platform.services.links.links(UUID(dev.id))
        assert await link.deliver_command(OutboundCommand(uuid4(), "ping", None)) is False
        publish = await client.next()
        assert publish.qos == 0 and json.loads(publish.payload)["method"] == "ping"


async def test_persistent_session_keeps_subscriptions_across_a_restart(tmp_path, port):
    env = platform_env(tmp_path, IIOT_MQTT_PORT=str(port))
    props = {mc.SESSION_EXPIRY: 3600}
    async with running_platform(env) as platform:
        [dev] = await create_devices(platform, 1)
        client = await Raw.open(port)
        ack = await client.connect(
            dev.token, client_id="keeper", clean_start=False, properties=props
        )
        assert not ack.session_present
        client.send(mc.encode_subscribe(mc.V5, 1, [("v1/devices/me/rpc/request/+", 1)]))
        await client.next()
        client.send(mc.encode_disconnect(mc.V5))
        await client.closed()
    async with running_platform(env) as platform:  # the sessions are in the database
        client = await Raw.open(port)
        ack = await client.connect(
            dev.token, client_id="keeper", clean_start=False, properties=props
        )
        assert ack.session_present
        [link] = platform.services.links.links(UUID(dev.id))
        assert link.listens_commands
        client.close()
        await client.closed()
        # A clean session starts empty, and so does the next persistent one.
        client = await Raw.open(port)
        ack = await client.connect(dev.token, client_id="keeper")
        assert not ack.session_present
        client.close()
        for _ in range(100):
            if await platform.services.store.get_mqtt_session(None, "keeper") is None:
                break
            await asyncio.sleep(0.02)
        assert await platform.services.store.get_mqtt_session(None, "keeper") is None


async def test_v5_clean_start_with_a_session_expiry_keeps_the_new_session(tmp_path, port):
    # paho's MQTT 5 default: Clean Start 1 on the first connection, 0 on reconnections.
    env = platform_env(tmp_path, IIOT_MQTT_PORT=str(port))
    props = {mc.SESSION_EXPIRY: 3600}
    async with running_platform(env) as platform:
        [dev] = await create_devices(platform, 1)
        client = await Raw.open(port)
        ack = await client.connect(dev.token, client_id="fresh", clean_start=True, properties=props)
        assert not ack.session_present
        client.send(mc.encode_subscribe(mc.V5, 1, [(f"devices/{dev.id}/commands/+", 1)]))
        await client.next()
        client.close()  # the network drops
        await client.closed()
        client = await Raw.open(port)
        ack = await client.connect(
            dev.token, client_id="fresh", clean_start=False, properties=props
        )
        assert ack.session_present
        [link] = platform.services.links.links(UUID(dev.id))
        assert link.listens_commands  # without subscribing again
        client.close()
        await client.closed()


async def test_gateway_children_get_commands_and_attributes_through_the_gateway(tmp_path, port):
    from tests.integration.test_mqtt_thingsboard import _gateway

    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        services = platform.services
        inbox = FakeInbox()
        services.inbox = inbox
        tenant_id, _gateway_id, token = await _gateway(platform)
        client = await Raw.open(port)
        await client.connect(token)
        client.send(
            mc.encode_subscribe(mc.V5, 1, [("v1/gateway/rpc", 1), ("v1/gateway/attributes", 1)])
        )
        assert await client.next() == mc.SubAck(1, [1, 1])
        client.send(mc.encode_publish(mc.V5, "v1/gateway/connect", b'{"device":"Pump 1"}', 1, 2))
        assert await client.next() == mc.PubAck(2, 0)
        devices = (await services.store.list_devices(tenant_id, 10, 0)).items
        child = next(d for d in devices if d.name == "Pump 1")
        [link] = services.links.links(child.id)
        command = OutboundCommand(uuid4(), "start", {"speed": 3})
        delivery = asyncio.ensure_future(link.deliver_command(command))
        publish = await client.next()
        assert publish.topic == "v1/gateway/rpc"
        body = json.loads(publish.payload)
        assert body["device"] == "Pump 1"
        assert body["data"]["method"] == "start" and body["data"]["params"] == {"speed": 3}
        client.send(mc.encode_puback(mc.V5, publish.packet_id))
        assert await delivery is True
        reply = {"device": "Pump 1", "id": body["data"]["id"], "data": {"success": True}}
        client.send(mc.encode_publish(mc.V5, "v1/gateway/rpc", json.dumps(reply).encode(), 1, 3))
        assert await client.next() == mc.PubAck(3, 0)
        assert inbox.replies == [(child.id, command.id, {"success": True})]
        delivered = asyncio.ensure_future(link.deliver_attributes({"limit": 5}, []))
        update = await client.next()
        assert update.topic == "v1/gateway/attributes"
        assert json.loads(update.payload) == {"device": "Pump 1", "data": {"limit": 5}}
        client.send(mc.encode_puback(mc.V5, update.packet_id))
        await delivered
        attrs = b'{"Pump 1": {"firmware": "2.0"}}'
        client.send(mc.encode_publish(mc.V5, "v1/gateway/attributes", attrs, 1, 4))
        assert await client.next() == mc.PubAck(4, 0)
        assert inbox.attributes == [(child.id, {"firmware": "2.0"})]
        client.send(mc.encode_publish(mc.V5, "v1/gateway/disconnect", b'{"device":"Pump 1"}', 1, 5))
        assert await client.next() == mc.PubAck(5, 0)
        assert services.links.links(child.id) == []
        client.close()


async def test_a_device_is_connected_while_its_connection_is_open(tmp_path, port):
    async with running_platform(platform_env(tmp_path, IIOT_MQTT_PORT=str(port))) as platform:
        [dev] = await create_devices(platform, 1)
        store = platform.services.store

        async def connected_is(expected: bool) -> None:
            for _ in range(100):
                device = await store.get_device(None, UUID(dev.id))
                if device.connected is expected:
                    return
                await asyncio.sleep(0.1)
            raise AssertionError(f"connected never became {expected}")

        # No subscription at all: an open connection is enough.
        client = await Raw.open(port, mc.V311)
        assert (await client.connect(dev.id, dev.token, client_id="plc")).code == 0
        await connected_is(True)
        client.close()
        await connected_is(False)
        assert (await store.get_device(None, UUID(dev.id))).last_seen is not None
