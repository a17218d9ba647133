"""Devices cannot forge commands on AMQP (item 3). A device account has what the docs
give it: write on exchange `iiot` (telemetry), read on the commands exchange and its own
queues. Commands come only from exchange `iiot.commands`, which devices cannot write: a
command a device publishes anywhere never reaches another device, the platform's do."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
import pytest

from iiot.adapters.amqp import AmqpAdapter
from iiot.adapters.amqp_commands import COMMAND_EXCHANGE
from iiot.control.rules import CommandRequest
from tests.amqp_support import make_devices, reset_broker
from tests.support import platform_env, running_platform

pytestmark = [
    pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="no rabbitmqctl"),
    # The shared RabbitMQ: never run these tests in parallel with each other.
    pytest.mark.shared_brokers,
]


def _ctl(*args: str) -> None:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, timeout=60)
    if done.returncode != 0:
        pytest.skip(f"rabbitmqctl not permitted here: {done.stderr.decode()[:200]}")


@pytest.fixture
def device_account(amqp_url: str) -> Iterator[str]:
    """A RabbitMQ user with a device's permissions in the test vhost; its URL."""
    parts = urlsplit(amqp_url)
    vhost = parts.path[1:] or "/"
    user, password = f"iiot-test-dev-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    _ctl("add_user", user, password)
    try:
        # configure/write/read regexes exactly as docs/protocols-amqp.md gives devices.
        queues = f"^{user}\\..*"
        _ctl(
            "set_permissions",
            "-p",
            vhost,
            user,
            queues,
            f"^iiot$|{queues}",
            f"^iiot\\.commands$|{queues}",
        )
        netloc = f"{user}:{password}@{parts.hostname}:{parts.port or 5672}"
        yield urlunsplit(parts._replace(netloc=netloc))
    finally:
        subprocess.run(["rabbitmqctl", "delete_user", user], capture_output=True, timeout=60)


async def _get(queue: aio_pika.abc.AbstractQueue, timeout_s: float) -> list[bytes]:
    found = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        message = await queue.get(fail=False, no_ack=True)
        if message is None:
            await asyncio.sleep(0.1)
            continue
        found.append(message.body)
    return found


async def test_a_device_cannot_command_another_device(
    tmp_path: Path, pg_url: str, amqp_url: str, device_account: str
) -> None:
    await reset_broker(amqp_url)
    attacker, victim = await make_devices(pg_url, 2)
    user = urlsplit(device_account).username
    env = platform_env(tmp_path, IIOT_DATABASE_URL=pg_url, IIOT_AMQP_URL=amqp_url)
    async with running_platform(env) as platform:
        adapter = next(c for c in platform.components if isinstance(c, AmqpAdapter))
        assert await adapter.wait_connected(15)
        # The victim's inbox, as the docs say: its own queue bound to its commands key.
        admin = await aio_pika.connect(amqp_url, timeout=10)
        async with admin:
            channel = await admin.channel()
            inbox = await channel.declare_queue(f"{user}.victim-inbox", exclusive=True)
            await inbox.bind(COMMAND_EXCHANGE, f"commands.{victim.id}")

            device = await aio_pika.connect(device_account, timeout=10)
            async with device:
                # Forging on the telemetry exchange: allowed to publish, reaches nobody.
                devch = await device.channel(publisher_confirms=True)
                iiot = await devch.get_exchange("iiot", ensure=False)
                forged = aio_pika.Message(json.dumps({"method": "open-valve"}).encode())
                await iiot.publish(forged, f"commands.{victim.id}")
                # Forging on the commands exchange: the broker refuses it.
                refused = await device.channel(publisher_confirms=True)
                commands = await refused.get_exchange(COMMAND_EXCHANGE, ensure=False)
                with pytest.raises(
                    (aiormq.exceptions.ChannelAccessRefused, aio_pika.exceptions.ChannelClosed)
                ):
                    await commands.publish(forged, f"commands.{victim.id}")
            assert await _get(inbox, 2.0) == []

            # The platform's own command does arrive.
            target = await platform.services.registry.get(victim.id)
            request = CommandRequest("ping", oneway=True, persistent=True)
            sent = await platform.services.commands.send(None, target, request, None)
            arrived = [json.loads(b) for b in await _get(inbox, 5.0)]
            assert [(c["id"], c["method"]) for c in arrived] == [(str(sent.id), "ping")]
    del attacker
