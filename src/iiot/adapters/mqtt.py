"""MQTT ingestion from an external broker (Mosquitto, EMQX) named by `IIOT_MQTT_URL`.

The platform subscribes to `devices/+/telemetry` (or `$share/{group}/devices/+/telemetry`
with `IIOT_MQTT_SHARED_GROUP`, so several platform processes split the load) at QoS 1 with a
persistent MQTT v5 session, and acknowledges each QoS 1 message only after its points are
committed (paho-mqtt's manual acknowledgement). Killed between receipt and commit, the
platform gets the message again from the broker on its next connection; writes are
idempotent, so each point is stored once.

The connection is `MqttSession` (asyncio, the `mqtt5` codec), reconnected here with
bounded backoff. A message of a known device is decoded and queued right where it is read
and acked from its commit callback (no task per message). Messages of a device not yet in
the registry's cache wait, in order, for one lookup of that device; anything else (unknown
devices, full queue, retries after a storage outage) goes through a task per message.

The broker is trusted to authenticate devices and enforce the topic ACL (see
`iiot.adapters.mosquitto_security` and docs/protocols-mqtt.md); the adapter resolves the
device from the topic and refuses unknown ids. At start it checks whether the broker lets
anonymous clients publish telemetry, and warns if so.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from typing import Any, Self
from uuid import UUID

import mqtt5

from iiot.adapters.mqtt_session import MqttError, MqttSession, Publish
from iiot.adapters.mqtt_shared import (
    DeviceLookup,
    RefusalLog,
    _BrokerUrl,
    _default_client_id,
    device_prefix,
    telemetry_topic,
)
from iiot.errors import DeviceDisabled, IIoTError, InvalidPayload, NotFound, StorageUnavailable
from iiot.model import Device, DevicePoints
from iiot.services import Services
from iiot.supervisor import Backoff, cancel_and_wait

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
_MAX_TOPICS = 200_000  # topics whose device id is remembered
# Room beside the payload in a PUBLISH packet: fixed header, topic, packet id, properties.
_PACKET_OVERHEAD = 4096


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
        # Ingest workers: a stable session each in the group; worker 1 keeps the id of a
        # single process, so going from one process to N workers leaves no session behind.
        if settings.worker_index > 1:
            self.client_id = f"{self.client_id}-w{settings.worker_index}"
        group = settings.mqtt_shared_group
        self.topic = f"$share/{group}/{TELEMETRY_FILTER}" if group else TELEMETRY_FILTER
        self.refusals = RefusalLog(log)
        self.devices = DeviceLookup(services)
        self._tls = ssl.create_default_context(cafile=self.url.ca_file) if self.url.tls else None
        self._session: MqttSession | None = None
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._topic_ids: dict[str, UUID] = {}  # telemetry topic -> device id
        # Messages of devices being looked up, in arrival order.
        self._parked: dict[UUID, list[tuple[Publish, MqttSession]]] = {}
        self._commits = 0  # fast-path messages awaiting commit
        self._commits_done = asyncio.Event()
        self._closing = False
        self._down_logged = False
        self._probed = False
        self.sessions = 0  # connections opened so far (1 + reconnections)

    # --- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._closing = False
        self._set_health(False, f"connecting to {self.url}")
        # A broker that is down at start is retried, with backoff, by the session loop.
        self._runner = asyncio.create_task(self._keep_connected(), name="mqtt-session")
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
        await cancel_and_wait(self._runner)
        session, self._session = self._session, None
        if session is not None:
            await session.disconnect()
        self.services.health.set(self.name, "down", "stopped")
        self.services.metrics.component_up.labels(self.name).set(0)
        self.services.metrics.connections.labels(PROTOCOL).set(0)

    def describe(self) -> str:
        """One line for the start-up log."""
        return f"MQTT external broker {self.url} (client id {self.client_id}, topic {self.topic})"

    # --- the connection ----------------------------------------------------------------
    async def _keep_connected(self) -> None:
        """Connect, subscribe, wait for the connection to end; again, with bounded backoff."""
        backoff = Backoff(initial_s=_RECONNECT_MIN_S, max_s=_RECONNECT_MAX_S)
        while True:
            try:
                session = await self._open()
            except (OSError, MqttError) as exc:
                self._went_down(str(exc) or type(exc).__name__)
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self._came_up()
            reason = await session.closed
            self._session = None
            self._went_down(reason)
            await asyncio.sleep(backoff.next_delay())

    async def _open(self) -> MqttSession:
        """A connected session with the telemetry subscription in place."""
        url = self.url
        connect = mqtt5.ConnectPacket(
            self.client_id,
            username=url.username,
            password=None if url.password is None else url.password.encode(),
            clean_start=False,  # resume the session: the broker kept our messages
            keep_alive=_KEEPALIVE_S,
            session_expiry_interval=SESSION_EXPIRY_S,
            receive_max=RECEIVE_MAXIMUM,
            # The broker drops (never sends) a message larger than this (MQTT v5 3.1.2.26).
            max_packet_size=self.services.settings.max_message_bytes + _PACKET_OVERHEAD,
        )
        session, _ = await MqttSession.connect(
            url.host, url.port, connect, self._received, tls=self._tls
        )
        self._session = session
        self.sessions += 1
        try:
            # Subscribing again is harmless when the session was resumed, and needed when not.
            granted = await session.subscribe(self.topic, qos=1)
        except MqttError:
            session.abort("no subscription")
            raise
        if granted.value >= 0x80:
            session.abort("subscription refused")
            raise MqttError(
                f"broker refused the subscription to {self.topic} ({granted.name}): check its ACL"
            )
        return session

    # --- state -------------------------------------------------------------------------
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
            self._start(self._probe_anonymous())

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

    def _start(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- ingestion ---------------------------------------------------------------------
    def _received(self, session: MqttSession, message: Publish) -> None:
        if self._closing:
            return  # not acked: the broker delivers it again on the next connection
        device_id = self._topic_ids.get(message.topic) or self._device_id(message.topic)
        if device_id is None:
            self._start(self._handle(message, session))
            return
        parked = self._parked.get(device_id)
        if parked is not None:  # its device is being looked up: keep the order
            parked.append((message, session))
            return
        device = self.services.registry.cached(device_id)
        if device is not None:
            self._ingest_now(device, message, session)
            return
        # One lookup per device, however many of its messages arrive meanwhile (after a
        # restart the broker delivers the backlog of every device at once).
        self._parked[device_id] = [(message, session)]
        self._start(self._look_up(device_id))

    def _device_id(self, topic: str) -> UUID | None:
        """The device id in a telemetry topic (remembered: parsing a UUID is not free)."""
        parts = topic.split("/")
        if len(parts) != 3 or parts[0] != "devices" or parts[2] != "telemetry":
            return None
        try:
            device_id = UUID(parts[1])
        except ValueError:
            return None
        if len(self._topic_ids) >= _MAX_TOPICS:
            self._topic_ids.clear()
        self._topic_ids[topic] = device_id
        return device_id

    async def _look_up(self, device_id: UUID) -> None:
        """Find a device, then ingest its parked messages (one by one if not found)."""
        try:
            device: Device | None = await self.devices.get(device_id)
        except (NotFound, StorageUnavailable):
            device = None
        parked = self._parked.pop(device_id, [])
        for message, session in parked:
            if self._closing or session.closed.done():
                continue  # not acked: the broker sends it again
            if device is None:
                self._start(self._handle(message, session))
            else:
                self._ingest_now(device, message, session)

    def _ingest_now(self, device: Device, message: Publish, session: MqttSession) -> None:
        """Fast path: queue a known device's message, ack on commit."""
        if message.duplicate:
            self.services.metrics.redeliveries.labels(PROTOCOL).inc()
        self._commits += 1
        ingestor = self.services.ingestor
        try:
            item = ingestor.decode(device, message.payload, PROTOCOL)
            # A partial, not a closure: fewer objects per message in flight (the collector
            # walks every one of them while thousands await their commit).
            ingestor.commit_nowait(
                item, PROTOCOL, functools.partial(self._committed, message, session, item)
            )
        except (InvalidPayload, DeviceDisabled) as exc:
            self._commits -= 1
            self.refusals.note(type(exc).__name__, f"message on {message.topic!r} refused: {exc}")
            self._ack(message, session)
        except StorageUnavailable:  # shutting down: not acked, the broker redelivers it
            self._commits -= 1
        except Exception as exc:  # a bug must not leave the message unsettled
            self._commits -= 1
            log.exception("MQTT message on %r could not be ingested", message.topic)
            self.services.ingestor.refused(PROTOCOL, exc, counted=True)
            self._ack(message, session)

    def _committed(
        self,
        message: Publish,
        session: MqttSession,
        item: DevicePoints,
        error: BaseException | None,
    ) -> None:
        self._commits -= 1
        if self._commits == 0 and self._closing:
            self._commits_done.set()
        if error is None:
            self._ack(message, session)
        elif isinstance(error, StorageUnavailable):
            self.services.ingestor.refused(PROTOCOL, error, counted=True)
            if not session.closed.done() and not self._closing:
                # Not acked: the broker keeps the message; retry its points (stamped
                # once) here with backoff.
                self._start(self._retry(item, message, session))
        else:  # refused for good by the store: settled (acked), logged like the slow path
            log.error("MQTT message on %r not stored: %s", message.topic, error)
            self._ack(message, session)

    @staticmethod
    def _ack(message: Publish, session: MqttSession) -> None:
        # Only on the connection that delivered it: after a reconnect the broker sends
        # it again, with the same or another packet id. QoS 0 messages are settled too:
        # the session bounds what it holds, whatever the QoS.
        session.settle(message)

    async def _retry(self, item: DevicePoints, message: Publish, session: MqttSession) -> None:
        """Commit a message's decoded points again after a storage outage, then ack."""
        backoff = Backoff(initial_s=0.5, max_s=5.0)
        while True:
            await asyncio.sleep(backoff.next_delay())
            if session.closed.done() or self._closing:
                return  # connection gone: the broker redelivers the message
            try:
                await self.services.ingestor.commit(item, PROTOCOL)
                break
            except StorageUnavailable:
                continue
            except IIoTError as exc:  # refused for good by the store: settle it
                log.error("MQTT message on %r not stored: %s", message.topic, exc)
                break
            except Exception:  # a bug must not leave the message unsettled
                log.exception("MQTT message on %r could not be ingested", message.topic)
                break
        self._ack(message, session)

    async def _handle(self, message: Publish, session: MqttSession) -> None:
        if message.duplicate:
            self.services.metrics.redeliveries.labels(PROTOCOL).inc()
        backoff = Backoff(initial_s=0.5, max_s=5.0)
        while True:
            try:
                item = await self._decode(message)
                break
            except StorageUnavailable:  # the device could not be looked up
                if session.closed.done() or self._closing:
                    return  # connection gone: the broker redelivers the message
                await asyncio.sleep(backoff.next_delay())
            except Exception:  # a bug must not leave the message unsettled
                log.exception("MQTT message on %r could not be ingested", message.topic)
                self._ack(message, session)
                return
        if item is None:
            self._ack(message, session)
            return
        while True:
            try:
                await self.services.ingestor.commit(item, PROTOCOL)
                break
            except StorageUnavailable:
                if session.closed.done() or self._closing:
                    return  # connection gone: the broker redelivers the message
                # Not acked: the broker keeps the message; retry here with backoff.
                await asyncio.sleep(backoff.next_delay())
            except IIoTError as exc:  # refused for good by the store: settle it
                log.error("MQTT message on %r not stored: %s", message.topic, exc)
                break
            except Exception:  # a bug must not leave the message unsettled
                log.exception("MQTT message on %r could not be ingested", message.topic)
                break
        self._ack(message, session)

    async def _decode(self, message: Publish) -> DevicePoints | None:
        """Decode one message; None when refused (counted and logged, then acked)."""
        services = self.services
        topic = message.topic
        parts = topic.split("/")
        if topic == PROBE_TOPIC:
            return None
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
            return None
        try:
            return services.ingestor.decode(device, message.payload, PROTOCOL)
        except (InvalidPayload, DeviceDisabled) as exc:
            self.refusals.note(type(exc).__name__, f"message on {topic!r} refused: {exc}")
            return None

    # --- anonymous probe ---------------------------------------------------------------
    async def _probe_anonymous(self) -> None:
        """Warn when the broker accepts telemetry from anonymous clients."""
        verdict = await self._anonymous_publish_verdict()
        if verdict:
            log.warning(
                "MQTT broker %s %s: anyone can send telemetry as any device. Secure it with "
                "per-device credentials and a topic ACL (see docs/protocols-mqtt.md, "
                "`iiot mosquitto --help`)",
                self.url,
                verdict,
            )

    async def _anonymous_publish_verdict(self) -> str | None:
        """What an anonymous client may do: None if it is refused (or it cannot be told)."""
        connect = mqtt5.ConnectPacket(
            f"iiot-probe-{time.monotonic_ns() % 10**9}", clean_start=True, keep_alive=10
        )
        try:
            session, _ = await MqttSession.connect(
                self.url.host,
                self.url.port,
                connect,
                lambda session, message: None,
                tls=self._tls,
                timeout_s=_PROBE_TIMEOUT_S,
            )
        except (OSError, MqttError):
            return None
        try:
            reason = await session.publish(PROBE_TOPIC, b"{}")
        except MqttError:
            return "accepts anonymous clients (whether they may publish is unknown)"
        finally:
            await session.disconnect()
        if reason.value < 0x80:
            return "lets anonymous clients publish to devices/+/telemetry"
        return None
