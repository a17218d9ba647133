"""MQTT 3.1.1 and 5.0 bytes -> packets: `Reader` cuts a byte stream into packets and refuses
a packet larger than the limit from its fixed header alone, before buffering its body."""

from __future__ import annotations

from iiot.adapters.mqtt_packets import (
    AUTH,
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    V5,
    V311,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    MalformedPacket,
    Packet,
    PacketTooLarge,
    PingReq,
    PingResp,
    PubAck,
    Publish,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Will,
)
from iiot.adapters.mqtt_properties import read_properties
from iiot.adapters.mqtt_wire import Cursor

__all__ = ["Reader", "decode_one"]


def _decode_connect(c: Cursor) -> Connect:
    name = c.text()
    level = c.byte()
    if name not in ("MQTT", "MQIsdp"):
        raise MalformedPacket(f"protocol name {name!r} is not MQTT")
    if level not in (V311, V5):
        # Only the level matters now: the caller answers "unsupported protocol version".
        return Connect(level=level, client_id="", protocol_name=name)
    flags = c.byte()
    if flags & 0x01:
        raise MalformedPacket("reserved CONNECT flag set")
    keepalive = c.u16()
    props = read_properties(c) if level == V5 else {}
    client_id = c.text()
    will = None
    if flags & 0x04:
        will_props = read_properties(c) if level == V5 else {}
        topic = c.text()
        will = Will(topic, c.binary(), (flags >> 3) & 0x03, bool(flags & 0x20), will_props)
        if will.qos > 2:
            raise MalformedPacket("will QoS 3")
    elif flags & 0x38:
        raise MalformedPacket("will QoS or retain without a will")
    username = c.text() if flags & 0x80 else None
    password = c.binary() if flags & 0x40 else None
    if c.left():
        raise MalformedPacket("bytes after the CONNECT payload")
    return Connect(
        level, client_id, bool(flags & 0x02), keepalive, username, password, will, props, name
    )


def _decode(kind: int, flags: int, body: memoryview, version: int) -> Packet:
    c = Cursor(body)
    if kind == PUBLISH:
        qos = (flags >> 1) & 0x03
        if qos == 3:
            raise MalformedPacket("PUBLISH with QoS 3")
        topic = c.text()
        packet_id = c.u16() if qos else 0
        if qos and packet_id == 0:
            raise MalformedPacket("PUBLISH with packet id 0")
        props = read_properties(c) if version == V5 else {}
        return Publish(
            topic, c.take(c.left()), qos, bool(flags & 0x01), bool(flags & 0x08), packet_id, props
        )
    if kind in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        if flags != (0x02 if kind == PUBREL else 0):
            raise MalformedPacket("wrong fixed-header flags")
        packet_id = c.u16()
        code = c.byte() if version == V5 and c.left() else 0
        if version == V5 and c.left():
            read_properties(c)
        if c.left():
            raise MalformedPacket("bytes after the acknowledgement")
        return PubAck(packet_id, code, kind)
    if kind == CONNECT:
        if flags:
            raise MalformedPacket("wrong fixed-header flags")
        return _decode_connect(c)
    if kind == SUBSCRIBE:
        if flags != 0x02:
            raise MalformedPacket("wrong fixed-header flags")
        packet_id = c.u16()
        props = read_properties(c) if version == V5 else {}
        filters = []
        while c.left():
            topic = c.text()
            options = c.byte()
            if options & (0xC0 if version == V5 else 0xFC) or options & 0x03 == 3:
                raise MalformedPacket("invalid subscription options")
            filters.append((topic, options))
        if not filters:
            raise MalformedPacket("SUBSCRIBE without a topic filter")
        return Subscribe(packet_id, filters, props)
    if kind == UNSUBSCRIBE:
        if flags != 0x02:
            raise MalformedPacket("wrong fixed-header flags")
        packet_id = c.u16()
        if version == V5:
            read_properties(c)
        names = []
        while c.left():
            names.append(c.text())
        if not names:
            raise MalformedPacket("UNSUBSCRIBE without a topic filter")
        return Unsubscribe(packet_id, names)
    if kind == PINGREQ:
        if flags or len(body):
            raise MalformedPacket("malformed PINGREQ")
        return PingReq()
    if kind == PINGRESP:
        return PingResp()
    if kind == DISCONNECT:
        if flags:
            raise MalformedPacket("wrong fixed-header flags")
        code = c.byte() if version == V5 and c.left() else 0
        props = read_properties(c) if version == V5 and c.left() else {}
        if c.left():
            raise MalformedPacket("bytes after DISCONNECT")
        return Disconnect(code, props)
    if kind == CONNACK:
        session_present = bool(c.byte() & 0x01)
        code = c.byte()
        props = read_properties(c) if version == V5 and c.left() else {}
        return ConnAck(session_present, code, props)
    if kind in (SUBACK, UNSUBACK):
        packet_id = c.u16()
        if version == V5:
            read_properties(c)
        codes = list(c.take(c.left()))
        return SubAck(packet_id, codes) if kind == SUBACK else UnsubAck(packet_id, codes)
    if kind == AUTH and version == V5:
        return Auth(c.byte() if c.left() else 0)
    raise MalformedPacket(f"packet type {kind} not allowed here")


class Reader:
    """Cuts a byte stream into packets; keeps at most one partial packet."""

    __slots__ = ("_buffer", "max_packet_size", "version")

    def __init__(self, max_packet_size: int, version: int = V311) -> None:
        self._buffer = bytearray()
        self.max_packet_size = max_packet_size
        self.version = version  # set from the CONNECT packet

    def buffered(self) -> int:
        """Bytes held for a packet not yet complete."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Packet]:
        """Append bytes; return the complete packets (raises `MalformedPacket`)."""
        buffer = self._buffer
        buffer += data
        packets: list[Packet] = []
        pos = 0
        size = len(buffer)
        view = memoryview(buffer)
        try:
            while size - pos >= 2:
                first = buffer[pos]
                length, shift, i = 0, 0, pos + 1
                while True:
                    if i >= size:
                        if i - pos > 4:
                            raise MalformedPacket("remaining length longer than 4 bytes")
                        length = -1
                        break
                    byte = buffer[i]
                    length |= (byte & 0x7F) << shift
                    i += 1
                    if not byte & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise MalformedPacket("remaining length longer than 4 bytes")
                if length < 0:
                    break
                total = i - pos + length
                if total > self.max_packet_size:
                    raise PacketTooLarge(
                        f"packet of {total} bytes; the maximum is {self.max_packet_size}"
                    )
                if size - i < length:
                    break
                packets.append(
                    _decode(first >> 4, first & 0x0F, view[i : i + length], self.version)
                )
                if packets[-1].__class__ is Connect:
                    level = packets[-1].level
                    self.version = V5 if level == V5 else V311
                pos = i + length
        finally:
            view.release()
        if pos:
            del buffer[:pos]
        return packets


def decode_one(data: bytes, version: int = V311, max_packet_size: int = 1 << 28) -> Packet:
    """Exactly one packet from `data` (tests)."""
    reader = Reader(max_packet_size, version)
    packets = reader.feed(data)
    if len(packets) != 1 or reader.buffered():
        raise MalformedPacket("not exactly one packet")
    return packets[0]
