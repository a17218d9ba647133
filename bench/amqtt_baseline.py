"""Bench-only baseline: the amqtt 0.12 broker the platform embedded before its own MQTT
endpoint (kept to measure the endpoint against; not part of the platform).


Devices log in with username = device id and password = device token, checked against the
registry; each may publish and subscribe only under `devices/{own id}/`. Telemetry published
to `devices/{own id}/telemetry` is ingested by the broker itself, and a QoS 1 message is
acknowledged (PUBACK) only once its points are committed.

How the PUBACK is held back: in amqtt 0.12 the protocol handler puts every incoming QoS 1/2
message into `session.delivered_message_queue` with `await queue.put(...)` and sends the
PUBACK (PUBCOMP for QoS 2) right after that call returns. At login the auth plugin gives the
session an `_IngestQueue` whose `put` first commits the telemetry through `Ingestor.ingest`.
QoS 0 messages arrive through `put_nowait` and are ingested best effort. A broker plugin
hook cannot do this: amqtt fires plugin events without waiting for them.

The TCP listener is ours (amqtt's "external" listener type) so that a taken port gives one
clear line and a `down` readiness instead of a traceback, and connections are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from dataclasses import dataclass
from typing import Any, Self
from uuid import UUID

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.errors import AMQTTError, BrokerError
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import ApplicationMessage, Session

from iiot.adapters.mqtt import (
    PROTOCOL,
    DeviceLookup,
    RefusalLog,
    device_prefix,
    telemetry_topic,
)
from iiot.errors import (
    AuthenticationError,
    DeviceDisabled,
    InvalidPayload,
    NotFound,
    StorageUnavailable,
)
from iiot.services import Services
from iiot.supervisor import Backoff

__all__ = ["EmbeddedBroker"]

log = logging.getLogger(__name__)

_LISTENER = "default"
# A disconnected device's broker session (subscriptions) is dropped after this long.
_SESSION_EXPIRY_S = 3600
# QoS 0 messages being ingested at once; beyond this they are dropped (QoS 0 is best effort).
_MAX_QOS0_IN_FLIGHT = 10_000


class _IngestQueue(asyncio.Queue[ApplicationMessage]):
    """A session's delivery queue whose `put` commits telemetry before amqtt sends PUBACK."""

    def __init__(self, gate: _Gate) -> None:
        super().__init__()
        self.gate = gate
        # The device this session logged in as; None after a failed login on the session.
        self.device_id: str | None = None

    async def put(self, item: ApplicationMessage) -> None:
        """Ingest (QoS 1/2: wait for the commit), then hand the message to the broker."""
        await self.gate.ingest(self.device_id, item)
        super().put_nowait(item)

    def put_nowait(self, item: ApplicationMessage) -> None:
        """QoS 0: ingest in the background (best effort), hand the message on at once."""
        self.gate.ingest_best_effort(self.device_id, item)
        super().put_nowait(item)


class _Gate:
    """Login, topic rules and ingestion for the embedded broker's plugins."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.refusals = RefusalLog(log)
        self.devices = DeviceLookup(services)
        self._qos0_tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def device_of(session: Session | None) -> str | None:
        """The device id a session is logged in as (None if not logged in)."""
        queue = getattr(session, "delivered_message_queue", None)
        return queue.device_id if isinstance(queue, _IngestQueue) else None

    async def authenticate(self, session: Session) -> bool:
        """Check username = device id and password = token; prepare the session for ingest."""
        queue = session.delivered_message_queue
        if not isinstance(queue, _IngestQueue):
            replacement = _IngestQueue(self)
            while not queue.empty():  # a resumed session may hold undelivered messages
                asyncio.Queue.put_nowait(replacement, queue.get_nowait())
            session.delivered_message_queue = replacement
            queue = replacement
        queue.device_id = None
        username, password = session.username, session.password
        metrics = self.services.metrics
        if not username or not password:
            metrics.auth_failures.labels(PROTOCOL).inc()
            self.refusals.note("login", f"client {session.client_id!r} sent no username/password")
            return False
        try:
            device = await self.services.registry.authenticate_id(username, password)
        except AuthenticationError as exc:
            metrics.auth_failures.labels(PROTOCOL).inc()
            self.refusals.note("login", f"login refused for {username!r}: {exc}")
            return False
        except StorageUnavailable as exc:
            self.refusals.note("login", f"login of {username!r} not checked: {exc}")
            return False
        queue.device_id = str(device.id)
        return True

    def allowed(self, session: Session | None, topic: str | None, action: Action | None) -> bool:
        """Whether this publish, subscription or delivery stays under `devices/{own id}/`."""
        device_id = self.device_of(session)
        ok = device_id is not None and (topic or "").startswith(device_prefix(device_id))
        if not ok and action in (Action.PUBLISH, Action.SUBSCRIBE):
            reason = "forbidden_topic" if action is Action.PUBLISH else "forbidden_subscription"
            self.services.metrics.messages_refused.labels(PROTOCOL, reason).inc()
            if action is Action.PUBLISH:
                self.services.metrics.messages_received.labels(PROTOCOL).inc()
            who = device_id or getattr(session, "client_id", "?")
            self.refusals.note(reason, f"device {who} may not {action.value} to {topic!r}")
        return ok

    async def ingest(self, device_id: str | None, message: ApplicationMessage) -> None:
        """Commit a QoS 1/2 telemetry message; other topics are left to the broker."""
        if device_id is None or message.topic != telemetry_topic(device_id):
            return
        packet = message.publish_packet
        if packet is not None and packet.dup_flag:
            self.services.metrics.redeliveries.labels(PROTOCOL).inc()
        backoff = Backoff(initial_s=0.5, max_s=5.0)
        while True:
            try:
                await self._ingest_once(device_id, bytes(message.data or b""))
                return
            except StorageUnavailable:
                # Keep the PUBACK back and try again: the device keeps the message until
                # then; if it disconnects, amqtt cancels this task and the device resends.
                await asyncio.sleep(backoff.next_delay())

    def ingest_best_effort(self, device_id: str | None, message: ApplicationMessage) -> None:
        """Ingest a QoS 0 telemetry message in the background; dropped under overload."""
        if device_id is None or message.topic != telemetry_topic(device_id):
            return
        if len(self._qos0_tasks) >= _MAX_QOS0_IN_FLIGHT:
            self.services.metrics.messages_received.labels(PROTOCOL).inc()
            self.services.metrics.messages_refused.labels(PROTOCOL, "overloaded").inc()
            self.refusals.note("overloaded", "QoS 0 message dropped: ingestion is saturated")
            return
        task = asyncio.create_task(self._ingest_qos0(device_id, bytes(message.data or b"")))
        self._qos0_tasks.add(task)
        task.add_done_callback(self._qos0_tasks.discard)

    async def _ingest_qos0(self, device_id: str, body: bytes) -> None:
        with contextlib.suppress(StorageUnavailable):  # counted; QoS 0 is best effort
            await self._ingest_once(device_id, body)

    async def _ingest_once(self, device_id: str, body: bytes) -> None:
        """Resolve the device and ingest; refusals are counted and logged, not raised."""
        services = self.services
        try:
            device = await self.devices.get(UUID(device_id))
        except NotFound:
            services.metrics.messages_received.labels(PROTOCOL).inc()
            services.metrics.messages_refused.labels(PROTOCOL, "unknown_device").inc()
            self.refusals.note("unknown_device", f"device {device_id} no longer exists")
            return
        try:
            await services.ingestor.ingest(device, body, PROTOCOL)
        except (InvalidPayload, DeviceDisabled) as exc:
            self.refusals.note(type(exc).__name__, f"message of device {device_id} refused: {exc}")

    async def close(self) -> None:
        """Cancel QoS 0 ingestion still running."""
        for task in list(self._qos0_tasks):
            task.cancel()
        await asyncio.gather(*self._qos0_tasks, return_exceptions=True)


class _GatedPlugin:
    """What both plugins share: the gate, handed over by `EmbeddedBroker` through the
    plugin configuration (amqtt builds `Config` from the plugin's settings)."""

    config: Any

    @dataclass
    class Config:
        gate: Any = None

    def __init__(self, context: BaseContext) -> None:
        # The next class in the plugin's MRO is amqtt's base plugin, which takes the context.
        super().__init__(context)  # type: ignore[call-arg]
        self.gate: _Gate = self.config.gate


class DeviceAuthPlugin(_GatedPlugin, BaseAuthPlugin):  # type: ignore[misc]
    """amqtt auth plugin: username = device id, password = device token."""

    async def authenticate(self, *, session: Session) -> bool | None:
        """True when the device id and token match."""
        return await self.gate.authenticate(session)


class DeviceTopicPlugin(_GatedPlugin, BaseTopicPlugin):  # type: ignore[misc]
    """amqtt topic plugin: a device may only use topics under `devices/{own id}/`."""

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        """True when the topic is under the device's own prefix."""
        return self.gate.allowed(session, topic, action)


class EmbeddedBroker:
    """The platform's own MQTT broker for devices."""

    name = "mqtt"

    def __init__(self, services: Services) -> None:
        self.services = services
        self._gate = _Gate(services)
        self._broker: Broker | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._problem: str | None = None

    async def __aenter__(self) -> Self:
        settings = self.services.settings
        health, metrics = self.services.health, self.services.metrics
        config = {
            "listeners": {_LISTENER: {"type": "external"}},
            "session_expiry_interval": _SESSION_EXPIRY_S,
            "plugins": {
                f"{__name__}.DeviceAuthPlugin": {"gate": self._gate},
                f"{__name__}.DeviceTopicPlugin": {"gate": self._gate},
            },
        }
        broker = Broker(config)
        try:
            await broker.start()
        except (BrokerError, AMQTTError) as exc:
            raise BrokerError(f"embedded MQTT broker cannot start: {exc}") from exc
        self._broker = broker
        try:
            self._server = await asyncio.start_server(
                self._on_connection, settings.bind_host, settings.mqtt_port, reuse_address=True
            )
        except OSError as exc:
            await self._stop_broker()
            port = settings.mqtt_port
            what = (
                "is taken (is Mosquitto running?)"
                if exc.errno == errno.EADDRINUSE
                else f"cannot be opened ({exc.strerror})"
            )
            self._problem = (
                f"MQTT port {port} {what}: set IIOT_MQTT_PORT to a free port, "
                f"or IIOT_MQTT_URL=mqtt://host:{port} to use that broker"
            )
            # Not fatal on purpose: the rest of the platform runs (e.g. next to Mosquitto).
            log.error("%s", self._problem)
            health.set(self.name, "down", self._problem)
            metrics.component_up.labels(self.name).set(0)
            return self
        health.set(self.name, "up", f"embedded broker on port {settings.mqtt_port}")
        metrics.component_up.labels(self.name).set(1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        await self._stop_broker()
        if self._connections:
            await asyncio.wait(self._connections, timeout=5)
        for task in self._connections:
            task.cancel()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        await self._gate.close()
        if self._problem is None:
            self.services.health.set(self.name, "down", "stopped")
            self.services.metrics.component_up.labels(self.name).set(0)

    async def _stop_broker(self) -> None:
        if self._broker is not None:
            broker, self._broker = self._broker, None
            await broker.shutdown()

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        gauge = self.services.metrics.connections.labels(PROTOCOL)
        gauge.inc()
        try:
            if self._broker is None:
                writer.close()
                return
            await self._broker.external_connected(
                StreamReaderAdapter(reader), StreamWriterAdapter(writer), _LISTENER
            )
        except (AMQTTError, ConnectionError, asyncio.IncompleteReadError) as exc:
            log.debug("MQTT connection ended: %s", exc)
        finally:
            gauge.dec()
            if task is not None:
                self._connections.discard(task)

    def describe(self) -> str:
        """One line for the start-up log."""
        settings = self.services.settings
        where = f"MQTT {settings.bind_host}:{settings.mqtt_port} (embedded broker)"
        return f"{where}: not listening, {self._problem}" if self._problem else where
