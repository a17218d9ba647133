"""One MQTT v5 client connection on asyncio, for the platform's subscription to a broker.

Packets are encoded and decoded by `mqtt5` (a sans-I/O MQTT v5 codec written in Rust);
this module only does what a subscriber needs around it: CONNECT, SUBSCRIBE, receiving
PUBLISH, acknowledging it when told, a QoS 1 PUBLISH (for the start-up probe), keep-alive
and DISCONNECT. Reconnecting is the caller's job: a session is one connection, and
`closed` completes when it ends.

Why not paho-mqtt: its network thread decoded at most ~22,000 QoS 1 messages/s here even
with nothing else to do (and handed each one across threads), against ~400,000 for this
loop (bench/README.md). Everything runs on the event loop, so a PUBLISH goes from the
socket to the ingest queue without a thread hop, and acks written in one loop iteration
leave in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any, Self, cast

import mqtt5

__all__ = ["MqttError", "MqttSession", "Publish"]

log = logging.getLogger(__name__)

Publish = mqtt5.PublishPacket
_ACK_TIMEOUT_S = 10.0  # CONNACK, SUBACK, PUBACK of our own publish
# Messages read but not yet settled, in count and payload bytes: above either, the session
# stops reading from the socket until settlements bring it back below half. QoS 0 messages
# count too (the broker's Receive Maximum only bounds QoS 1), so the worst case in memory
# is these bounds plus one socket read, not 20,000 x 256 KiB.
MAX_HELD_MESSAGES = 20_000
MAX_HELD_BYTES = 64 * 1024 * 1024


class MqttError(Exception):
    """The broker refused something, broke the protocol, or the connection ended."""


class MqttSession(asyncio.Protocol):
    """A connection to an MQTT v5 broker; `on_publish(session, packet)` is called for every
    PUBLISH (from the first one after CONNACK, which may come before `connect` returns)."""

    def __init__(
        self, on_publish: Callable[[MqttSession, Publish], None], max_packet_size: int = 0
    ) -> None:
        self._on_publish = on_publish
        self.max_packet_size = max_packet_size  # 0: no limit
        self.held = 0  # messages read, not yet settled
        self.held_bytes = 0
        self.paused = False  # reading from the socket is paused (too much held)
        self.pauses = 0  # times reading was paused
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._acks: list[bytes] = []
        self._replies: dict[tuple[type, int], asyncio.Future[Any]] = {}
        self._connack: asyncio.Future[mqtt5.ConnAckPacket] | None = None
        self._next_id = 0
        self._ping: asyncio.TimerHandle | None = None
        self._pong_due = False
        self.keep_alive = 0
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.closed: asyncio.Future[str] = loop.create_future()  # why it ended

    # --- opening and closing -------------------------------------------------------------
    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        connect: mqtt5.ConnectPacket,
        on_publish: Callable[[MqttSession, Publish], None],
        *,
        tls: ssl.SSLContext | None = None,
        timeout_s: float = _ACK_TIMEOUT_S,
    ) -> tuple[Self, mqtt5.ConnAckPacket]:
        """Open a connection and send `connect`; raises `MqttError` or `OSError`.

        The CONNECT's Maximum Packet Size (if set) is enforced here too: a packet announced
        larger ends the connection before its bytes are buffered.
        """
        loop = asyncio.get_running_loop()
        session = cls(on_publish, connect.max_packet_size or 0)
        session._connack = loop.create_future()
        await asyncio.wait_for(
            loop.create_connection(
                lambda: session, host, port, ssl=tls, server_hostname=host if tls else None
            ),
            timeout_s,
        )
        session._send(connect.write())
        try:
            connack = await asyncio.wait_for(asyncio.shield(session._connack), timeout_s)
        except TimeoutError:
            session.abort("no CONNACK")
            raise MqttError(f"no CONNACK within {timeout_s:.0f} s") from None
        if connack.reason_code.value != 0:  # SUCCESS
            session.abort("connection refused")
            raise MqttError(f"broker refused the connection: {connack.reason_code.name}")
        keep_alive = connack.server_keep_alive
        session.keep_alive = connect.keep_alive if keep_alive is None else keep_alive
        session._schedule_ping()
        return session, connack

    async def disconnect(self) -> None:
        """Say goodbye (the session stays on the broker) and close."""
        if self._transport is not None and not self._transport.is_closing():
            self._flush_acks()
            self._send(mqtt5.DisconnectPacket().write())
            self._transport.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self.closed), 5)

    def abort(self, reason: str) -> None:
        """Drop the connection at once."""
        self._finish(reason)
        if self._transport is not None:
            self._transport.abort()

    # --- requests ------------------------------------------------------------------------
    async def subscribe(self, pattern: str, qos: int = 1) -> mqtt5.SubAckReasonCode:
        """Subscribe to one topic filter; the broker's reason code (granted QoS or refusal)."""
        packet_id = self._new_id()
        topic = mqtt5.TopicFilter(pattern, max_qos=mqtt5.QoS(qos))
        reply = self._expect(mqtt5.SubAckPacket, packet_id)
        self._send(mqtt5.SubscribePacket(packet_id, [topic]).write())
        suback: mqtt5.SubAckPacket = await self._wait(reply, "SUBACK")
        return suback.reason_codes[0]

    async def publish(self, topic: str, payload: bytes) -> mqtt5.PubAckReasonCode:
        """Publish at QoS 1; the broker's PUBACK reason code."""
        packet_id = self._new_id()
        reply = self._expect(mqtt5.PubAckPacket, packet_id)
        packet = mqtt5.PublishPacket(
            topic, payload, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=packet_id
        )
        self._send(packet.write())
        puback: mqtt5.PubAckPacket = await self._wait(reply, "PUBACK")
        return puback.reason_code

    def settle(self, packet: Publish) -> None:
        """Done with a received message: acknowledge it (QoS 1) and release its place."""
        if packet.packet_id is not None:
            self.ack(packet.packet_id)
        self.held -= 1
        self.held_bytes -= len(packet.payload)
        if (
            self.paused
            and self.held <= MAX_HELD_MESSAGES // 2
            and self.held_bytes <= MAX_HELD_BYTES // 2
        ):
            self.paused = False
            if self._transport is not None and not self._transport.is_closing():
                self._transport.resume_reading()

    def ack(self, packet_id: int) -> None:
        """Acknowledge a QoS 1 PUBLISH. Acks are sent in the order of these calls, all
        those of one event-loop iteration in one write."""
        if self.closed.done():
            return  # the broker sends the message again on the next connection
        if not self._acks:
            self._loop.call_soon(self._flush_acks)
        self._acks.append(mqtt5.PubAckPacket(packet_id).write())

    # --- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport subclasses, so no isinstance).
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(f"connection lost: {exc}" if exc else "connection closed by the broker")

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        used = 0
        read = mqtt5.read
        publish_type = mqtt5.PublishPacket
        on_publish = self._on_publish
        view = memoryview(buffer)
        try:
            while used < len(buffer):
                try:
                    packet, size = read(view[used:])
                except IndexError:  # an incomplete packet: wait for the rest
                    break
                used += size
                if type(packet) is publish_type:
                    self.held += 1
                    self.held_bytes += len(packet.payload)
                    try:
                        on_publish(self, packet)
                    except Exception:
                        # The handler's failure, not the broker's: settle this one
                        # message instead of dropping the connection (which would only
                        # bring the same message back, again and again).
                        log.exception("MQTT: handling a message on %r failed", packet.topic)
                        self.settle(packet)
                else:
                    self._control(packet)
        except ValueError as exc:
            view.release()
            log.warning("MQTT broker sent a malformed packet (%s); reconnecting", exc)
            self.abort(f"malformed packet from the broker: {exc}")
            return
        view.release()
        del buffer[:used]
        self._pong_due = False  # anything from the broker shows it is alive
        if buffer and self.max_packet_size and len(buffer) > self.max_packet_size:
            # A packet larger than we announced we accept: a broker bug or not a broker.
            self.abort(f"packet over the maximum size of {self.max_packet_size} bytes")
            return
        if not self.paused and (self.held > MAX_HELD_MESSAGES or self.held_bytes > MAX_HELD_BYTES):
            self.paused = True
            self.pauses += 1
            if self._transport is not None:
                self._transport.pause_reading()

    # --- internals -----------------------------------------------------------------------
    def _control(self, packet: Any) -> None:
        kind = type(packet)
        if kind is mqtt5.ConnAckPacket:
            if self._connack is not None and not self._connack.done():
                self._connack.set_result(packet)
        elif kind in (mqtt5.SubAckPacket, mqtt5.PubAckPacket):
            reply = self._replies.pop((kind, packet.packet_id), None)
            if reply is not None and not reply.done():
                reply.set_result(packet)
        elif kind is mqtt5.DisconnectPacket:
            self.abort(f"broker disconnected: {packet.reason_code.name}")
        elif kind is not mqtt5.PingRespPacket:
            log.debug("MQTT: ignoring %s", kind.__name__)

    def _send(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _flush_acks(self) -> None:
        acks, self._acks = self._acks, []
        if acks:
            self._send(b"".join(acks))

    def _new_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def _expect(self, kind: type, packet_id: int) -> asyncio.Future[Any]:
        reply: asyncio.Future[Any] = self._loop.create_future()
        self._replies[(kind, packet_id)] = reply
        return reply

    async def _wait(self, reply: asyncio.Future[Any], what: str) -> Any:
        done, _ = await asyncio.wait(
            {reply, self.closed}, timeout=_ACK_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if reply in done:
            return reply.result()
        if self.closed.done():
            raise MqttError(f"no {what}: {self.closed.result()}")
        self.abort(f"no {what}")
        raise MqttError(f"no {what} within {_ACK_TIMEOUT_S:.0f} s")

    def _schedule_ping(self) -> None:
        if self.keep_alive > 0 and not self.closed.done():
            # Half the keep-alive: the broker hears from us in time even on a busy link.
            self._ping = self._loop.call_later(self.keep_alive / 2, self._keep_alive)

    def _keep_alive(self) -> None:
        if self._pong_due:  # nothing at all from the broker for a whole interval
            self.abort("broker did not answer PINGREQ")
            return
        self._pong_due = True
        self._send(mqtt5.PingReqPacket().write())
        self._schedule_ping()

    def _finish(self, reason: str) -> None:
        if self._ping is not None:
            self._ping.cancel()
        if not self.closed.done():
            self.closed.set_result(reason)
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(MqttError(reason))
            self._connack.exception()  # retrieved here: `connect` reports it
        self._acks.clear()
