"""Helpers for the one-command-at-a-time tests (no tests here): a paho device on the
platform's MQTT endpoint, in our topic form or ThingsBoard's, and command history checks."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import queue
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho

from tests.e2e.api_helpers import Api
from tests.integration.test_mqtt_support import connect


@dataclass(frozen=True)
class Received:
    """One command as the device got it, and where its answer goes."""

    method: str
    params: Any
    reply_topic: str
    command_id: str | None  # our topic form names it; ThingsBoard's has a request number


class PahoDevice:
    """A paho MQTT 3.1.1 device (the token as username) listening for commands at QoS 1."""

    @classmethod
    async def open(cls, port: int, device: dict[str, Any], *, thingsboard: bool) -> PahoDevice:
        """Connect and subscribe in a thread: the platform may run on this event loop."""
        return await asyncio.to_thread(cls, port, device, thingsboard=thingsboard)

    def __init__(self, port: int, device: dict[str, Any], *, thingsboard: bool) -> None:
        """Connect and subscribe (blocking); returns once the SUBACK came."""
        self._inbox: queue.Queue[Received] = queue.Queue()
        self.client = connect(port, device["token"], None, f"dev-{uuid.uuid4().hex[:8]}")
        self._thingsboard = thingsboard
        subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_args: subscribed.set()
        ours = f"devices/{device['id']}/commands/+"
        topic = "v1/devices/me/rpc/request/+" if thingsboard else ours
        self.client.subscribe(topic, qos=1)
        if not subscribed.wait(10):
            raise TimeoutError("no SUBACK")

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        body = json.loads(message.payload)
        if self._thingsboard:
            number = message.topic.rsplit("/", 1)[1]
            reply, command_id = f"v1/devices/me/rpc/response/{number}", None
        else:
            reply, command_id = f"{message.topic}/reply", message.topic.rsplit("/", 1)[1]
        self._inbox.put(Received(body["method"], body.get("params"), reply, command_id))

    async def _get(self, timeout_s: float) -> Received | None:
        # Short waits in the thread: a cancelled wait must not hold the loop's executor.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return None
            with contextlib.suppress(queue.Empty):
                return await asyncio.to_thread(self._inbox.get, True, min(left, 0.2))

    async def next(self, timeout_s: float = 15.0) -> Received:
        """The next command; fails when none came in time."""
        got = await self._get(timeout_s)
        if got is None:
            raise AssertionError(f"no command within {timeout_s} s")
        return got

    async def nothing_for(self, seconds: float) -> None:
        """Fail if a command arrives within `seconds`."""
        extra = await self._get(seconds)
        if extra is not None:
            raise AssertionError(f"a command came while another was in flight: {extra}")

    async def answer(self, received: Received, body: Any) -> None:
        """Publish the reply at QoS 1 and wait for its PUBACK (off the event loop, which
        may be the platform's own)."""
        info = self.client.publish(received.reply_topic, json.dumps(body), qos=1)
        await asyncio.to_thread(info.wait_for_publish, 10)

    async def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)


async def persistent(api: Api, device: dict[str, Any], method: str, **extra: Any) -> Any:
    """A persistent command (202)."""
    return await api.ok(
        "POST",
        f"/api/devices/{device['id']}/commands",
        202,
        json={"method": method, "persistent": True, **extra},
        headers=api.admin,
    )


async def until(api: Api, command_id: str, *statuses: str) -> dict[str, Any]:
    """The command once it is in one of `statuses`."""
    command: dict[str, Any] = {}
    for _ in range(300):
        command = await api.ok("GET", f"/api/commands/{command_id}", headers=api.admin)
        if command["status"] in statuses:
            return command
        await asyncio.sleep(0.05)
    raise AssertionError(f"command {command_id} never became {statuses}: {command}")


def first_ts(command: dict[str, Any], status: str) -> int:
    """When the command first entered `status` (Unix ms)."""
    return min(t["ts"] for t in command["transitions"] if t["status"] == status)


def last_ts(command: dict[str, Any], status: str) -> int:
    """When the command last entered `status` (Unix ms)."""
    return max(t["ts"] for t in command["transitions"] if t["status"] == status)


def assert_one_after_another(commands: list[dict[str, Any]], end: str = "SUCCESSFUL") -> None:
    """Each command was first sent only after the one before it reached `end`."""
    for before, after in itertools.pairwise(commands):
        assert first_ts(after, "SENT") >= last_ts(before, end), (before, after)
