"""MQTT ingestion from an external broker (Mosquitto, EMQX) named by `IIOT_MQTT_URL`.

The platform subscribes to `devices/+/telemetry` (or `$share/{group}/devices/+/telemetry`
with `IIOT_MQTT_SHARED_GROUP`, so several platform processes split the load) at QoS 1 with a
persistent MQTT v5 session, and acknowledges each QoS 1 message only after its points are
committed (paho-mqtt's manual acknowledgement). Killed between receipt and commit, the
platform gets the message again from the broker on its next connection; writes are
idempotent, so each point is stored once.

Threads: paho's network loop runs in paho's own thread (`loop_start`), which also
reconnects with bounded backoff. Received messages are handed to the asyncio loop in
batches (one wake-up per burst); the acknowledgement is queued back to paho from the loop.
A message of a cached device is decoded and queued right there and acked from its commit
callback (no task per message); anything else (uncached device, full queue, retries after a
storage outage) goes through a task per message.

The broker is trusted to authenticate devices and enforce the topic ACL (see
`iiot.adapters.mosquitto_security` and docs/protocols-mqtt.md); the adapter resolves the
device from the topic and refuses unknown ids. At start it checks whether the broker lets
anonymous clients publish telemetry, and warns if so.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import socket
import threading
import time
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit
from uuid import UUID

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from iiot.errors import DeviceDisabled, InvalidPayload, NotFound, StorageUnavailable
from iiot.model import Device
from iiot.services import Services
from iiot.supervisor import Backoff

__all__ = [
    "PROTOCOL",
    "TELEMETRY_FILTER",
    "DeviceLookup",
    "MqttAdapter",
    "RefusalLog",
    "device_prefix",
    "telemetry_topic",
]

log = logging.getLogger(__name__)

PROTOCOL = "mqtt"
TELEMETRY_FILTER = "devices/+/telemetry"
# Topic of the start-up probe for anonymous publishing (the nil UUID is never a device).
PROBE_TOPIC = "devices/00000000-0000-0000-0000-000000000000/telemetry"
# How long the broker keeps the platform's session (and queues its messages) while it is away.
SESSION_EXPIRY_S = 7 * 24 * 3600
# QoS 1 messages the broker may have in flight to the platform awaiting PUBACK (MQTT v5
# Receive Maximum). Acks wait for a commit, so this window bounds the throughput.
RECEIVE_MAXIMUM = 20_000
_KEEPALIVE_S = 30
_RECONNECT_MIN_S, _RECONNECT_MAX_S = 1, 30
_PROBE_TIMEOUT_S = 5.0


def telemetry_topic(device_id: str) -> str:
    """The topic a device publishes telemetry to."""
    return f"devices/{device_id}/telemetry"


def device_prefix(device_id: str) -> str:
    """Every topic a device may use starts with this."""
    return f"devices/{device_id}/"


class RefusalLog:
    """Logs refusals at most once per interval per kind, with the count of those skipped."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._skipped: collections.Counter[str] = collections.Counter()

    def note(self, kind: str, message: str) -> None:
        """Log this refusal unless one of the same kind was logged recently."""
        now = time.monotonic()
        if now - self._last.get(kind, -self._interval) < self._interval:
            self._skipped[kind] += 1
            return
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        suffix = f" ({skipped} similar refusals not logged)" if skipped else ""
        self._logger.info("MQTT: %s%s", message, suffix)


class DeviceLookup:
    """`registry.get` with concurrent lookups of one device merged into one query.

    A burst of messages from devices not yet cached would otherwise send one query per
    message and starve the batch writer of pool connections.
    """

    def __init__(self, services: Services) -> None:
        self._registry = services.registry
        self._pending: dict[UUID, asyncio.Future[Device]] = {}

    async def get(self, device_id: UUID) -> Device:
        """The device (`NotFound`, `StorageUnavailable` as `registry.get`)."""
        device = self._registry.cached(device_id)
        if device is not None:
            return device
        pending = self._pending.get(device_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Device] = asyncio.get_running_loop().create_future()
        self._pending[device_id] = future
        try:
            device = await self._registry.get(device_id)
        except BaseException as exc:
            if isinstance(exc, Exception):
                future.set_exception(exc)
                future.exception()  # retrieved: waiters re-raise it, nobody else must
            else:
                future.cancel()
            raise
        finally:
            del self._pending[device_id]
        future.set_result(device)
        return device


class _BrokerUrl:
    """The parts of `IIOT_MQTT_URL`."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.tls = parts.scheme == "mqtts"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (8883 if self.tls else 1883)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        self.client_id = query.get("client_id")
        self.ca_file = query.get("ca")

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def _default_client_id(services: Services) -> str:
    """A client id stable across restarts, so the persistent session is resumed."""
    group = services.settings.mqtt_shared_group
    if not group:
        return "iiot-platform"
    # Each member of a shared group needs its own stable session: host + data directory.
    where = f"{socket.gethostname()}:{services.settings.data_dir.resolve()}"
    return f"iiot-{group}-{hashlib.sha256(where.encode()).hexdigest()[:12]}"


def _new_client(url: _BrokerUrl, client_id: str, manual_ack: bool) -> paho.Client:
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5,
        manual_ack=manual_ack,
    )
    if url.tls:
        client.tls_set(ca_certs=url.ca_file)
    return client


class MqttAdapter:
    """Subscribes to device telemetry on an external broker; acks after commit."""

    name = "mqtt"

    def __init__(self, services: Services) -> None:
        self.services = services
        settings = services.settings
        if not settings.mqtt_url:
            raise ValueError("MqttAdapter needs IIOT_MQTT_URL")
        self.url = _BrokerUrl(settings.mqtt_url)
        self.client_id = self.url.client_id or _default_client_id(services)
        group = settings.mqtt_shared_group
        self.topic = f"$share/{group}/{TELEMETRY_FILTER}" if group else TELEMETRY_FILTER
        self.refusals = RefusalLog(log)
        self.devices = DeviceLookup(services)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        # Written by paho's thread only: the connection number, so that a message received
        # on an earlier connection is never acked on a later one (the broker resends it).
        self._generation = 0
        self._inbox: collections.deque[tuple[paho.MQTTMessage, int]] = collections.deque()
        self._wakeup_pending = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._commits = 0  # fast-path messages awaiting commit
        self._commits_done = asyncio.Event()
        self._closing = False
        self._down_logged = False
        self._probed = False

    # --- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._set_health(False, f"connecting to {self.url}")
        client = _new_client(self.url, self.client_id, manual_ack=True)
        if self.url.username is not None:
            client.username_pw_set(self.url.username, self.url.password)
        client.reconnect_delay_set(_RECONNECT_MIN_S, _RECONNECT_MAX_S)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        properties.ReceiveMaximum = RECEIVE_MAXIMUM
        # connect_async: a broker that is down at start is retried by paho's loop.
        client.connect_async(
            self.url.host,
            self.url.port,
            keepalive=_KEEPALIVE_S,
            clean_start=False,
            properties=properties,
        )
        client.loop_start()
        self._client = client
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        if self._tasks or self._commits:
            # Let commits under way finish so their acks go out before we leave.
            waits = [*self._tasks, asyncio.ensure_future(self._commits_done.wait())]
            if not self._commits:
                self._commits_done.set()
            await asyncio.wait(waits, timeout=10)
            waits[-1].cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)
        self.services.health.set(self.name, "down", "stopped")
        self.services.metrics.component_up.labels(self.name).set(0)
        self.services.metrics.connections.labels(PROTOCOL).set(0)

    def describe(self) -> str:
        """One line for the start-up log."""
        return f"MQTT external broker {self.url} (client id {self.client_id}, topic {self.topic})"

    # --- paho callbacks (paho's thread) ------------------------------------------------
    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._call(self._went_down, f"broker refused the connection: {reason}")
            return
        self._generation += 1
        # Subscribing again is harmless when the session was resumed, and needed when not.
        client.subscribe(self.topic, qos=1)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if any(reason.is_failure for reason in reasons):
            self._call(
                self._went_down,
                f"broker refused the subscription to {self.topic} ({reasons[0]}): check its ACL",
            )
        else:
            self._call(self._came_up)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not self._closing:
            self._call(self._went_down, f"disconnected: {reason}")

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._inbox.append((message, self._generation))
        if not self._wakeup_pending:
            self._wakeup_pending = True
            self._call(self._drain)

    def _call(self, func: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: we are shutting down
                loop.call_soon_threadsafe(func, *args)

    # --- state (asyncio loop) ----------------------------------------------------------
    def _set_health(self, up: bool, detail: str) -> None:
        self.services.health.set(self.name, "up" if up else "down", detail)
        self.services.metrics.component_up.labels(self.name).set(1 if up else 0)
        self.services.metrics.connections.labels(PROTOCOL).set(1 if up else 0)

    def _came_up(self) -> None:
        self._set_health(True, f"connected to {self.url}, subscribed to {self.topic}")
        if self._down_logged:
            log.warning("MQTT broker %s recovered; subscribed to %s", self.url, self.topic)
            self._down_logged = False
        if not self._probed:
            self._probed = True
            task = asyncio.create_task(self._probe_anonymous())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _went_down(self, reason: str) -> None:
        if self._closing:
            return
        self._set_health(False, f"{self.url}: {reason}")
        if not self._down_logged:
            log.error(
                "MQTT broker %s down (%s); reconnecting with backoff up to %d s",
                self.url,
                reason,
                _RECONNECT_MAX_S,
            )
            self._down_logged = True

    def _drain(self) -> None:
        self._wakeup_pending = False  # before popping: a message appended later wakes us again
        while self._inbox:
            message, generation = self._inbox.popleft()
            if self._closing:
                continue  # not acked: the broker delivers it again on the next connection
            if not self._ingest_now(message, generation):
                self._start(self._handle(message, generation))

    def _start(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ingest_now(self, message: paho.MQTTMessage, generation: int) -> bool:
        """Fast path: queue a cached device's message, ack on commit; False if not taken."""
        parts = message.topic.split("/")
        if len(parts) != 3 or parts[0] != "devices" or parts[2] != "telemetry":
            return False
        try:
            device = self.services.registry.cached(UUID(parts[1]))
        except ValueError:
            return False
        if device is None:
            return False
        if message.dup:
            self.services.metrics.redeliveries.labels(PROTOCOL).inc()
        self._commits += 1
        try:
            self.services.ingestor.ingest_nowait(
                device,
                bytes(message.payload),
                PROTOCOL,
                lambda error: self._committed(error, message, generation),
            )
        except (InvalidPayload, DeviceDisabled) as exc:
            self._commits -= 1
            self.refusals.note(type(exc).__name__, f"message on {message.topic!r} refused: {exc}")
            self._ack(message, generation)
            return True
        except StorageUnavailable:  # shutting down: not acked, the broker redelivers it
            self._commits -= 1
            return True
        return True

    def _committed(
        self, error: BaseException | None, message: paho.MQTTMessage, generation: int
    ) -> None:
        self._commits -= 1
        if self._commits == 0 and self._closing:
            self._commits_done.set()
        if error is None:
            self._ack(message, generation)
        elif isinstance(error, StorageUnavailable):
            self.services.ingestor.refused(PROTOCOL, error, counted=True)
            if generation == self._generation and not self._closing:
                # Not acked: the broker keeps the message; retry here with backoff.
                self._start(self._handle(message, generation, retried=True))
        else:  # refused for good by the store: not acked, logged like the slow path
            log.error("MQTT message on %r not stored: %s", message.topic, error)

    def _ack(self, message: paho.MQTTMessage, generation: int) -> None:
        if message.qos > 0 and generation == self._generation and self._client is not None:
            self._client.ack(message.mid, message.qos)

    # --- ingestion ---------------------------------------------------------------------
    async def _handle(
        self, message: paho.MQTTMessage, generation: int, retried: bool = False
    ) -> None:
        if message.dup and not retried:
            self.services.metrics.redeliveries.labels(PROTOCOL).inc()
        backoff = Backoff(initial_s=0.5, max_s=5.0)
        if retried:
            await asyncio.sleep(backoff.next_delay())
        while True:
            try:
                await self._ingest(message)
                break
            except StorageUnavailable:
                if generation != self._generation or self._closing:
                    return  # connection gone: the broker redelivers the message
                # Not acked: the broker keeps the message; retry here with backoff.
                await asyncio.sleep(backoff.next_delay())
        self._ack(message, generation)

    async def _ingest(self, message: paho.MQTTMessage) -> None:
        """Ingest one message; refusals are counted and logged (and then acked)."""
        services = self.services
        topic = message.topic
        parts = topic.split("/")
        if topic == PROBE_TOPIC:
            return
        device = None
        if len(parts) == 3 and parts[0] == "devices" and parts[2] == "telemetry":
            with contextlib.suppress(ValueError):
                device_id = UUID(parts[1])
                with contextlib.suppress(NotFound):
                    device = await self.devices.get(device_id)
        if device is None:
            services.metrics.messages_received.labels(PROTOCOL).inc()
            services.metrics.messages_refused.labels(PROTOCOL, "unknown_device").inc()
            self.refusals.note("unknown_device", f"message on {topic!r}: no such device")
            return
        try:
            await services.ingestor.ingest(device, bytes(message.payload), PROTOCOL)
        except (InvalidPayload, DeviceDisabled) as exc:
            self.refusals.note(type(exc).__name__, f"message on {topic!r} refused: {exc}")

    # --- anonymous probe ---------------------------------------------------------------
    async def _probe_anonymous(self) -> None:
        """Warn when the broker accepts telemetry from anonymous clients."""
        verdict = await asyncio.to_thread(self._anonymous_publish_verdict)
        if verdict:
            log.warning(
                "MQTT broker %s %s: anyone can send telemetry as any device. Secure it with "
                "per-device credentials and a topic ACL (see docs/protocols-mqtt.md, "
                "`iiot mosquitto --help`)",
                self.url,
                verdict,
            )

    def _anonymous_publish_verdict(self) -> str | None:
        """What an anonymous client may do: None if it is refused (or it cannot be told)."""
        client = _new_client(self.url, f"iiot-probe-{time.monotonic_ns() % 10**9}", False)
        connected, published = threading.Event(), threading.Event()
        outcome: dict[str, bool] = {}

        def on_connect(c: paho.Client, u: Any, f: Any, reason: ReasonCode, p: Any) -> None:
            outcome["connected"] = not reason.is_failure
            connected.set()

        def on_publish(c: paho.Client, u: Any, mid: int, reason: ReasonCode, p: Any) -> None:
            outcome["published"] = not reason.is_failure
            published.set()

        client.on_connect = on_connect
        client.on_publish = on_publish
        try:
            client.connect(self.url.host, self.url.port, keepalive=10)
        except OSError:
            return None
        client.loop_start()
        try:
            if not connected.wait(_PROBE_TIMEOUT_S) or not outcome.get("connected"):
                return None
            client.publish(PROBE_TOPIC, b"{}", qos=1)
            if not published.wait(_PROBE_TIMEOUT_S):
                return "accepts anonymous clients (whether they may publish is unknown)"
            if outcome.get("published"):
                return "lets anonymous clients publish to devices/+/telemetry"
            return None
        finally:
            client.disconnect()
            client.loop_stop()
