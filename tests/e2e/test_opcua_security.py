"""OPC UA security end to end: trust folder, None policy and anonymous login, restart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua

from tests.e2e.api_helpers import ADMIN_PASSWORD, api_platform
from tests.e2e.test_opcua_server import NS_URI, make_client_cert, opcua_client, trust
from tests.support import free_port

# The shared RabbitMQ/Mosquitto: never run these tests in parallel with each other.
pytestmark = pytest.mark.shared_brokers


async def test_unknown_client_certificate_is_refused_then_trusted_once_moved(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    cert = make_client_cert(tmp_path / "client")
    async with api_platform(data_dir, IIOT_OPCUA_PORT=str(port)):
        assert (data_dir / "pki" / "own" / "cert.der").is_file()
        with pytest.raises((ua.UaError, OSError, TimeoutError)):
            async with opcua_client(port, cert, "admin", ADMIN_PASSWORD):
                pass
        rejected = list((data_dir / "pki" / "rejected").iterdir())
        assert len(rejected) == 1
        # The administrator moves it to trusted/: the next connection is accepted.
        rejected[0].rename(data_dir / "pki" / "trusted" / rejected[0].name)
        async with opcua_client(port, cert, "admin", ADMIN_PASSWORD) as client:
            assert await client.get_namespace_index(NS_URI) > 0


async def test_none_policy_and_anonymous_are_off_by_default(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    cert = make_client_cert(tmp_path / "client")
    async with api_platform(data_dir, IIOT_OPCUA_PORT=str(port)):
        trust(data_dir, cert)
        with pytest.raises((ua.UaError, OSError, TimeoutError)):
            async with opcua_client(port, None, "admin", ADMIN_PASSWORD):
                pass  # no security
        with pytest.raises(ua.UaError):
            async with opcua_client(port, cert, None, None):
                pass  # anonymous over an encrypted channel


async def test_restart_binds_at_once_and_allow_none_opens_anonymous_access(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    cert = make_client_cert(tmp_path / "client")
    async with api_platform(data_dir, IIOT_OPCUA_PORT=str(port)):
        trust(data_dir, cert)
        async with opcua_client(port, cert, "admin", ADMIN_PASSWORD) as client:
            assert await client.get_namespace_index(NS_URI) > 0
    own_cert = (data_dir / "pki" / "own" / "cert.der").read_bytes()
    # The server closed its connections (TIME_WAIT); the same port binds again at once.
    async with api_platform(data_dir, IIOT_OPCUA_PORT=str(port), IIOT_OPCUA_ALLOW_NONE="1"):
        assert (data_dir / "pki" / "own" / "cert.der").read_bytes() == own_cert  # kept
        async with opcua_client(port, None, None, None) as client:  # None policy, anonymous
            assert await client.get_namespace_index(NS_URI) > 0
        async with opcua_client(port, cert, "admin", ADMIN_PASSWORD) as client:
            assert await client.get_namespace_index(NS_URI) > 0


async def test_set_status_is_published_as_an_amqp_command(tmp_path: Path, amqp_url: str) -> None:
    import json

    import aio_pika

    data_dir = tmp_path / "data"
    port = free_port()
    cert = make_client_cert(tmp_path / "client")
    async with api_platform(data_dir, IIOT_OPCUA_PORT=str(port), IIOT_AMQP_URL=amqp_url) as api:
        trust(data_dir, cert)
        tenant = await api.tenant("amqp-tenant")
        device = await api.device(api.admin, "valve", tenant_id=tenant["id"])
        connection = await aio_pika.connect_robust(amqp_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                "iiot.commands", aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(exchange, f"commands.{device['id']}")
            async with opcua_client(port, cert, "admin", ADMIN_PASSWORD) as client:
                ns = await client.get_namespace_index(NS_URI)
                node = client.get_node(ua.NodeId(f"device:{device['id']}", ns))
                method = client.get_node(ua.NodeId(f"device:{device['id']}:SetStatus", ns))
                await node.call_method(method, "maintenance")
            # The device says it listens (docs/commands.md): its queued commands follow.
            iiot = await channel.declare_exchange("iiot", aio_pika.ExchangeType.TOPIC, durable=True)
            await iiot.publish(
                aio_pika.Message(b"", headers={"token": device["token"]}),
                routing_key=f"replies.{device['id']}",
            )
            message = await _next_message(queue)
            body = json.loads(message.body)
            assert body["method"] == "SetStatus" and body["params"] == {"status": "maintenance"}
            assert message.correlation_id == body["id"]  # a tracked command, with its id
            await message.ack()


async def _next_message(queue: Any) -> Any:
    """The next message of a queue (commands are published once the queue is found)."""
    for _ in range(200):
        message = await queue.get(fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.05)
    raise AssertionError("no command arrived")
