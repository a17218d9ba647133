"""One device connection to the platform's MQTT endpoint (an asyncio protocol).

Per connection: the CONNECT handshake (its login and CONNACK in `mqtt_login`), keep-alive
(1.5x), the order of PUBACKs (one per QoS 1 PUBLISH, in arrival order, each sent once what
it asked for is done: telemetry committed), the in-flight window (reading pauses while it
is full, so a fast device waits for the pipeline instead of being buffered), subscriptions
and the platform's own QoS 1 publishes to the device (commands, attributes) with their
PUBACK futures.

Refusals: a malformed or oversize packet closes the connection (v5: DISCONNECT with the
reason first); a topic the device may not use is answered with reason 0x87 in v5 and by
closing the connection in 3.1.1, which has no negative PUBACK; QoS 2 is not offered
(v5: Maximum QoS 1 in CONNACK, a QoS 2 PUBLISH gets DISCONNECT 0x9B; 3.1.1: the
connection is closed).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, cast

from iiot.adapters import mqtt_codec as mc
from iiot.adapters.mqtt_login import MqttLogin
from iiot.adapters.mqtt_topics import TELEMETRY, Route, may_subscribe, route, topic_matches
from iiot.errors import DeviceDisabled, InvalidPayload, StorageUnavailable
from iiot.links import DeliveryFailed
from iiot.model import Device

if TYPE_CHECKING:
    from iiot.adapters.mqtt_server import MqttServer

__all__ = ["MqttConnection"]

log = logging.getLogger("iiot.adapters.mqtt_server")

PROTOCOL = "mqtt"
_CONNECT_TIMEOUT_S = 10.0

# v5 reason codes used here.
NOT_AUTHORIZED_5 = 0x87
MALFORMED_5, PROTOCOL_ERROR_5, TOO_LARGE_5 = 0x81, 0x82, 0x95
QOS_NOT_SUPPORTED_5, TAKEN_OVER_5, KEEPALIVE_TIMEOUT_5 = 0x9B, 0x8E, 0x8D
SERVER_SHUTTING_DOWN_5, PAYLOAD_INVALID_5, IMPL_ERROR_5 = 0x8B, 0x99, 0x83
RECEIVE_MAX_EXCEEDED_5 = 0x93


class _Ack:
    """A PUBLISH awaiting what it asked for; acknowledged in arrival order.

    For telemetry it is also the pipeline's completion callback (`__call__`), holding what a
    retry needs: one object per message in flight instead of a closure and its cells, which
    the garbage collector would walk while tens of thousands of messages await their commit.
    """

    __slots__ = ("body", "code", "connection", "device", "packet_id")

    def __init__(self, packet_id: int) -> None:
        self.packet_id = packet_id
        self.code: int | None = None
        self.connection: MqttConnection | None = None
        self.device: Device | None = None
        self.body = b""

    def __call__(self, error: BaseException | None) -> None:
        """The telemetry was committed (`error` None) or not."""
        assert self.connection is not None
        self.connection._committed(self, error)


class MqttConnection(MqttLogin, asyncio.Protocol):
    """The server side of one MQTT connection (its CONNECT handshake: `MqttLogin`)."""

    def __init__(self, server: MqttServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.reader = mc.Reader(server.max_packet_size)
        self.version = mc.V311
        self.device: Device | None = None
        self.client_id = ""
        self.persistent = False
        self.session_expiry = 0  # v5 Session Expiry Interval, seconds (the will's deadline)
        self.subscriptions: dict[str, int] = {}  # filter -> granted QoS
        self.will: mc.Will | None = None
        self.closed = False
        self.window = server.receive_maximum
        self._held: list[mc.Packet] | None = None  # packets read while CONNECT is checked
        self._acks: deque[_Ack] = deque()
        self._reading_paused = False
        self._writing_paused = False
        self._keepalive = 0.0
        self._last_rx = self.loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._next_id = 0
        self._outgoing: dict[int, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._out: list[bytes] = []  # bytes to send at the end of this loop turn
        self._flush_due = False
        self.peer = "?"
        self.extra: dict[str, Any] = {}  # per-connection state of the topic actions

    # --- asyncio protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport subclasses, so no isinstance).
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._timer = self.loop.call_later(_CONNECT_TIMEOUT_S, self._connect_timeout)
        self.server.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        was_closed = self.closed
        self.closed = True
        for future in self._outgoing.values():
            if not future.done():
                future.set_exception(DeliveryFailed("the device's MQTT connection closed"))
                future.exception()
        self._outgoing.clear()
        self.reader = mc.Reader(0)  # a pending will keeps this object: drop any partial packet
        self.server.lost(self, abnormal=not was_closed or self.will is not None)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        self._last_rx = self.loop.time()
        try:
            packets = self.reader.feed(data)
        except mc.PacketTooLarge as exc:
            self.refuse("too_large", str(exc), TOO_LARGE_5)
            return
        except mc.MalformedPacket as exc:
            self.refuse("malformed", f"malformed packet: {exc}", MALFORMED_5)
            return
        for packet in packets:
            if self.closed:
                return
            if self._held is not None:
                self._held.append(packet)
            else:
                self._handle(packet)

    def eof_received(self) -> bool | None:
        return None

    # --- writing -------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Send bytes unless the connection is closing.

        Written at the end of this turn of the event loop, together with whatever else is
        due then: the PUBACKs of one committed batch go out in one send, not one each.
        """
        if self.transport is None or self.closed:
            return
        self._out.append(data)
        if not self._flush_due:
            self._flush_due = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self, code: int | None = None) -> None:
        """Close the connection (v5: with a DISCONNECT carrying `code` first)."""
        if self.closed or self.transport is None:
            return
        self._flush()
        if code is not None and self.version == mc.V5 and self.device is not None:
            self.transport.write(mc.encode_disconnect(mc.V5, code))
        self.closed = True
        self.transport.close()

    def refuse(self, reason: str, message: str, code_v5: int | None) -> None:
        """Count, log (rate-limited) and close the connection."""
        self.server.refused(reason, f"{self._who()}: {message}; connection closed")
        self.close(code_v5)

    def _who(self) -> str:
        if self.device is not None:
            return f"device {self.device.id}"
        return f"client {self.client_id or '?'} from {self.peer}"

    # --- dispatch ------------------------------------------------------------------------
    def _handle(self, packet: mc.Packet) -> None:
        kind = packet.__class__
        if self.device is None:
            if kind is mc.Connect:
                self._on_connect(packet)  # type: ignore[arg-type]
            else:
                self.refuse("protocol_error", "first packet is not CONNECT", None)
            return
        if kind is mc.Publish:
            self._on_publish(packet)  # type: ignore[arg-type]
        elif kind is mc.PubAck:
            self._on_puback(packet)  # type: ignore[arg-type]
        elif kind is mc.PingReq:
            self.write(mc.PINGRESP_BYTES)
        elif kind is mc.Subscribe:
            self._on_subscribe(packet)  # type: ignore[arg-type]
        elif kind is mc.Unsubscribe:
            self._on_unsubscribe(packet)  # type: ignore[arg-type]
        elif kind is mc.Disconnect:
            self._on_disconnect(packet)  # type: ignore[arg-type]
        else:
            self.refuse("protocol_error", f"unexpected {kind.__name__} packet", PROTOCOL_ERROR_5)

    def _on_disconnect(self, packet: mc.Disconnect) -> None:
        expiry = packet.properties.get(mc.SESSION_EXPIRY)
        if expiry is not None:  # v5 may change it when leaving; the will's deadline with it
            if expiry and not self.session_expiry:
                # A session that was to end with the connection cannot be kept after all.
                self.refuse("protocol_error", "session expiry set at DISCONNECT", PROTOCOL_ERROR_5)
                return
            self.session_expiry = expiry
        if packet.code != 0x04:  # 0x04: "disconnect with will message"
            self.will = None
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # --- keep-alive ----------------------------------------------------------------------
    def _connect_timeout(self) -> None:
        if self.device is None and not self.closed:
            self.refuse("connect_timeout", "no CONNECT within 10 s", None)

    def _schedule_keepalive(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._keepalive > 0:
            self._timer = self.loop.call_at(self._last_rx + self._keepalive, self._check_alive)

    def _check_alive(self) -> None:
        self._timer = None
        if self.closed:
            return
        if self.loop.time() - self._last_rx >= self._keepalive:
            self.refuse("keepalive", "silent for 1.5x its keep-alive", KEEPALIVE_TIMEOUT_5)
        else:
            self._schedule_keepalive()

    # --- PUBLISH from the device -----------------------------------------------------------
    def _on_publish(self, packet: mc.Publish) -> None:
        device = self.device
        assert device is not None
        if packet.qos == 2:
            self.refuse("qos2", "QoS 2 is not supported", QOS_NOT_SUPPORTED_5)
            return
        if mc.TOPIC_ALIAS in packet.properties:
            self.refuse("protocol_error", "topic aliases are not supported", 0x94)
            return
        found = route(str(device.id), device.is_gateway, packet.topic)
        if found is None:
            self.server.forbidden(self, "forbidden_topic", f"may not publish to {packet.topic!r}")
            if self.version == mc.V5:
                if packet.qos:
                    self.write(mc.encode_puback(mc.V5, packet.packet_id, NOT_AUTHORIZED_5))
            else:
                self.close()  # 3.1.1 has no negative PUBACK: closing keeps the device honest
            return
        if packet.dup:
            self.server.services.metrics.redeliveries.labels(PROTOCOL).inc()
        ack = _Ack(packet.packet_id if packet.qos else 0)
        if len(self._acks) >= self.window and self.version == mc.V5 and packet.qos:
            self.refuse("receive_maximum", "more QoS 1 messages in flight than announced", 0x93)
            return
        self._acks.append(ack)
        self._update_reading()
        if found.action == TELEMETRY:
            self._telemetry(device, packet.payload, ack)
        else:
            self._track(asyncio.ensure_future(self._action(found, packet, ack)))

    def _telemetry(self, device: Device, body: bytes, ack: _Ack) -> None:
        ingestor = self.server.services.ingestor
        ack.connection, ack.device, ack.body = self, device, body
        try:
            ingestor.ingest_nowait(device, body, PROTOCOL, ack)
        except (InvalidPayload, DeviceDisabled) as exc:
            self.server.note(type(exc).__name__, f"message of {self._who()} refused: {exc}")
            self._settle(ack, PAYLOAD_INVALID_5 if isinstance(exc, InvalidPayload) else 0x87)
        except StorageUnavailable:
            self._track(asyncio.ensure_future(self._retry(device, body, ack)))

    def _committed(self, ack: _Ack, error: BaseException | None) -> None:
        if error is None:
            self._settle(ack, 0)
        elif isinstance(error, StorageUnavailable):
            assert ack.device is not None
            self._track(asyncio.ensure_future(self._retry(ack.device, ack.body, ack)))
        else:
            self._settle(ack, IMPL_ERROR_5)

    async def _retry(self, device: Device, body: bytes, ack: _Ack) -> None:
        """Storage is away: keep the PUBACK back; the device keeps the message until then."""
        delay = 0.5
        while not self.closed:
            try:
                await self.server.services.ingestor.ingest(device, body, PROTOCOL)
            except StorageUnavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            except (InvalidPayload, DeviceDisabled):
                self._settle(ack, PAYLOAD_INVALID_5)
                return
            self._settle(ack, 0)
            return

    async def _action(self, found: Route, packet: mc.Publish, ack: _Ack) -> None:
        try:
            code = await self.server.actions.run(self, found, packet.payload)
        except Exception:
            log.exception("MQTT action %s of %s failed", found.action, self._who())
            code = IMPL_ERROR_5
        self._settle(ack, code)

    def _settle(self, ack: _Ack, code: int) -> None:
        """Mark one PUBLISH done; send every PUBACK now due, in arrival order."""
        ack.code = code
        acks = self._acks
        v5 = self.version == mc.V5
        while acks and acks[0].code is not None:
            done = acks.popleft()
            if done.packet_id:
                code = (done.code or 0) if v5 else 0
                self.write(mc.encode_puback(self.version, done.packet_id, code))
        self._update_reading()

    def _update_reading(self) -> None:
        """Pause reading while the in-flight window or the socket's write buffer is full."""
        transport = self.transport
        if transport is None or self.closed:
            return
        full = len(self._acks) >= self.window or self._writing_paused
        if full and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif (
            self._reading_paused
            and not self._writing_paused
            and len(self._acks) <= self.window // 2
        ):
            self._reading_paused = False
            transport.resume_reading()

    # --- SUBSCRIBE / UNSUBSCRIBE -----------------------------------------------------------
    def _on_subscribe(self, packet: mc.Subscribe) -> None:
        device = self.device
        assert device is not None
        codes = []
        for topic_filter, options in packet.filters:
            if may_subscribe(str(device.id), device.is_gateway, topic_filter):
                granted = min(options & 0x03, 1)
                self.subscriptions[topic_filter] = granted
                codes.append(granted)
            else:
                self.server.forbidden(
                    self, "forbidden_subscription", f"may not subscribe to {topic_filter!r}"
                )
                codes.append(NOT_AUTHORIZED_5 if self.version == mc.V5 else 0x80)
        self.write(mc.encode_suback(self.version, packet.packet_id, codes))
        self.server.subscriptions_changed(self)

    def _on_unsubscribe(self, packet: mc.Unsubscribe) -> None:
        for topic_filter in packet.filters:
            self.subscriptions.pop(topic_filter, None)
        self.write(mc.encode_unsuback(self.version, packet.packet_id, len(packet.filters)))
        self.server.subscriptions_changed(self)

    def subscribed(self, topic: str) -> int | None:
        """The QoS the device gets `topic` at, or None when it does not listen to it."""
        best: int | None = None
        for topic_filter, qos in self.subscriptions.items():
            if topic_matches(topic_filter, topic) and (best is None or qos > best):
                best = qos
        return best

    # --- PUBLISH to the device -------------------------------------------------------------
    def send(self, topic: str, payload: bytes, qos: int) -> asyncio.Future[None] | None:
        """Publish to the device; at QoS 1 a future done at its PUBACK (None at QoS 0)."""
        if self.closed:
            raise DeliveryFailed("the device's MQTT connection closed")
        if qos == 0:
            self.write(mc.encode_publish(self.version, topic, payload))
            return None
        if len(self._outgoing) >= 65535:
            raise DeliveryFailed("too many messages awaiting the device's PUBACK")
        while True:
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._outgoing:
                break
        future: asyncio.Future[None] = self.loop.create_future()
        self._outgoing[self._next_id] = future
        self.write(mc.encode_publish(self.version, topic, payload, 1, self._next_id))
        return future

    def _on_puback(self, packet: mc.PubAck) -> None:
        if packet.kind != mc.PUBACK:
            self.refuse("protocol_error", "QoS 2 flow packet received", PROTOCOL_ERROR_5)
            return
        future = self._outgoing.pop(packet.packet_id, None)
        if future is None or future.done():
            return
        if packet.code >= 0x80:
            future.set_exception(DeliveryFailed(f"the device answered reason 0x{packet.code:02x}"))
            future.exception()
        else:
            future.set_result(None)

    # --- helpers ---------------------------------------------------------------------------
    def _track(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel_tasks(self) -> list[asyncio.Future[Any]]:
        """Cancel what still runs for this connection (the server is stopping)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return tasks
