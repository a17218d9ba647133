"""MQTT 3.1.1 and 5.0 packets <-> bytes (pure: no I/O, no asyncio).

One codec for both versions: the version is a parameter of each call (4 = 3.1.1, 5 = 5.0),
learnt from the CONNECT packet. `Reader` cuts a byte stream into packets and refuses a
packet larger than the limit from its fixed header alone, before buffering its body.
Every malformed input raises `MalformedPacket` (or `PacketTooLarge`), never anything else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "V5",
    "V311",
    "ConnAck",
    "Connect",
    "Disconnect",
    "MalformedPacket",
    "PacketTooLarge",
    "PingReq",
    "PingResp",
    "PubAck",
    "Publish",
    "Reader",
    "SubAck",
    "Subscribe",
    "UnsubAck",
    "Unsubscribe",
    "Will",
    "encode_connack",
    "encode_connect",
    "encode_disconnect",
    "encode_puback",
    "encode_publish",
    "encode_suback",
    "encode_subscribe",
    "encode_unsuback",
    "encode_unsubscribe",
]

V311, V5 = 4, 5

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)

PINGRESP_BYTES = b"\xd0\x00"
PINGREQ_BYTES = b"\xc0\x00"


class MalformedPacket(Exception):
    """The bytes are not a valid MQTT packet (v5 reason code 0x81)."""


class PacketTooLarge(MalformedPacket):
    """A packet larger than the announced maximum (v5 reason code 0x95)."""


# --- v5 properties: id -> kind ------------------------------------------------------------
_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)
_PROPERTY_KINDS: dict[int, int] = {
    0x01: _BYTE, 0x02: _U32, 0x03: _STR, 0x08: _STR, 0x09: _BIN, 0x0B: _VARINT,
    0x11: _U32, 0x12: _STR, 0x13: _U16, 0x15: _STR, 0x16: _BIN, 0x17: _BYTE,
    0x18: _U32, 0x19: _BYTE, 0x1A: _STR, 0x1C: _STR, 0x1F: _STR, 0x21: _U16,
    0x22: _U16, 0x23: _U16, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _U32,
    0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}  # fmt: skip
USER_PROPERTY = 0x26
SESSION_EXPIRY, RECEIVE_MAXIMUM, MAXIMUM_PACKET_SIZE = 0x11, 0x21, 0x27
ASSIGNED_CLIENT_ID, SERVER_KEEP_ALIVE, REASON_STRING = 0x12, 0x13, 0x1F
MAXIMUM_QOS, RETAIN_AVAILABLE, TOPIC_ALIAS_MAXIMUM, TOPIC_ALIAS = 0x24, 0x25, 0x22, 0x23
WILDCARD_AVAILABLE, SUB_IDS_AVAILABLE, SHARED_AVAILABLE = 0x28, 0x29, 0x2A
AUTH_METHOD = 0x15

Properties = dict[int, Any]


# --- packets --------------------------------------------------------------------------------
@dataclass(slots=True)
class Will:
    """The message published for a client that disappears without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Connect:
    """CONNECT: protocol level, client id, credentials, session and will."""

    level: int
    client_id: str
    clean_start: bool = True
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = field(default_factory=dict)
    protocol_name: str = "MQTT"


@dataclass(slots=True)
class ConnAck:
    """CONNACK (decoded on the client side: tests and the bench load generator)."""

    session_present: bool
    code: int
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Publish:
    """PUBLISH in either direction."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class PubAck:
    """PUBACK (and PUBREC/PUBREL/PUBCOMP, which share its shape: `kind`)."""

    packet_id: int
    code: int = 0
    kind: int = PUBACK


@dataclass(slots=True)
class Subscribe:
    """SUBSCRIBE: (filter, options byte) pairs; the low two bits of options are the QoS."""

    packet_id: int
    filters: list[tuple[str, int]]
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class SubAck:
    """SUBACK (client side)."""

    packet_id: int
    codes: list[int]


@dataclass(slots=True)
class Unsubscribe:
    """UNSUBSCRIBE."""

    packet_id: int
    filters: list[str]


@dataclass(slots=True)
class UnsubAck:
    """UNSUBACK (client side)."""

    packet_id: int
    codes: list[int]


@dataclass(slots=True)
class PingReq:
    """PINGREQ."""


@dataclass(slots=True)
class PingResp:
    """PINGRESP (client side)."""


@dataclass(slots=True)
class Disconnect:
    """DISCONNECT (v5 carries a reason code and properties)."""

    code: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Auth:
    """AUTH (v5 enhanced authentication; the platform does not offer it)."""

    code: int = 0


Packet = (
    Connect | ConnAck | Publish | PubAck | Subscribe | SubAck | Unsubscribe | UnsubAck
    | PingReq | PingResp | Disconnect | Auth
)  # fmt: skip


# --- primitive readers ------------------------------------------------------------------------
class _Cursor:
    """Reads MQTT primitives from one packet body; every overrun is `MalformedPacket`."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes | memoryview, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise MalformedPacket("packet ends too early")
        chunk = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return chunk

    def byte(self) -> int:
        if self.pos >= self.end:
            raise MalformedPacket("packet ends too early")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def u16(self) -> int:
        if self.pos + 2 > self.end:
            raise MalformedPacket("packet ends too early")
        value = (self.data[self.pos] << 8) | self.data[self.pos + 1]
        self.pos += 2
        return value

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def varint(self) -> int:
        value, shift = 0, 0
        for _ in range(4):
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
        raise MalformedPacket("variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        raw = self.binary()
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedPacket("string is not valid UTF-8") from exc
        if "\x00" in value:
            raise MalformedPacket("string contains U+0000")
        return value

    def properties(self) -> Properties:
        length = self.varint()
        end = self.pos + length
        if end > self.end:
            raise MalformedPacket("properties run past the packet")
        props: Properties = {}
        while self.pos < end:
            ident = self.varint()
            kind = _PROPERTY_KINDS.get(ident)
            value: Any
            if kind is None:
                raise MalformedPacket(f"unknown property 0x{ident:02x}")
            if kind == _BYTE:
                value = self.byte()
            elif kind == _U16:
                value = self.u16()
            elif kind == _U32:
                value = self.u32()
            elif kind == _VARINT:
                value = self.varint()
            elif kind == _STR:
                value = self.text()
            elif kind == _BIN:
                value = self.binary()
            else:
                props.setdefault(USER_PROPERTY, []).append((self.text(), self.text()))
                continue
            if ident in props and ident != 0x0B:
                raise MalformedPacket(f"property 0x{ident:02x} given twice")
            props[ident] = value
        if self.pos != end:
            raise MalformedPacket("properties run past their length")
        return props


# --- decoding ---------------------------------------------------------------------------------
def _decode_connect(c: _Cursor) -> Connect:
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
    props = c.properties() if level == V5 else {}
    client_id = c.text()
    will = None
    if flags & 0x04:
        will_props = c.properties() if level == V5 else {}
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
    c = _Cursor(body)
    if kind == PUBLISH:
        qos = (flags >> 1) & 0x03
        if qos == 3:
            raise MalformedPacket("PUBLISH with QoS 3")
        topic = c.text()
        packet_id = c.u16() if qos else 0
        if qos and packet_id == 0:
            raise MalformedPacket("PUBLISH with packet id 0")
        props = c.properties() if version == V5 else {}
        return Publish(
            topic, c.take(c.left()), qos, bool(flags & 0x01), bool(flags & 0x08), packet_id, props
        )
    if kind in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        if flags != (0x02 if kind == PUBREL else 0):
            raise MalformedPacket("wrong fixed-header flags")
        packet_id = c.u16()
        code = c.byte() if version == V5 and c.left() else 0
        if version == V5 and c.left():
            c.properties()
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
        props = c.properties() if version == V5 else {}
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
            c.properties()
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
        props = c.properties() if version == V5 and c.left() else {}
        if c.left():
            raise MalformedPacket("bytes after DISCONNECT")
        return Disconnect(code, props)
    if kind == CONNACK:
        session_present = bool(c.byte() & 0x01)
        code = c.byte()
        props = c.properties() if version == V5 and c.left() else {}
        return ConnAck(session_present, code, props)
    if kind in (SUBACK, UNSUBACK):
        packet_id = c.u16()
        if version == V5:
            c.properties()
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


# --- encoding ---------------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _str(value: str) -> bytes:
    raw = value.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def _bin(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


def _properties(props: Properties | None) -> bytes:
    if not props:
        return b"\x00"
    out = bytearray()
    for ident, value in props.items():
        kind = _PROPERTY_KINDS[ident]
        if kind == _PAIR:
            for key, val in value:
                out += _varint(ident) + _str(key) + _str(val)
            continue
        out += _varint(ident)
        if kind == _BYTE:
            out.append(value)
        elif kind == _U16:
            out += value.to_bytes(2, "big")
        elif kind == _U32:
            out += value.to_bytes(4, "big")
        elif kind == _VARINT:
            out += _varint(value)
        elif kind == _STR:
            out += _str(value)
        else:
            out += _bin(value)
    return _varint(len(out)) + bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def encode_connack(
    version: int, code: int, session_present: bool = False, props: Properties | None = None
) -> bytes:
    """CONNACK (the code is a 3.1.1 return code or a v5 reason code, per `version`)."""
    body = bytes((1 if session_present and code == 0 else 0, code))
    if version == V5:
        body += _properties(props)
    return _packet(0x20, body)


def encode_publish(
    version: int,
    topic: str,
    payload: bytes,
    qos: int = 0,
    packet_id: int = 0,
    retain: bool = False,
    dup: bool = False,
    props: Properties | None = None,
) -> bytes:
    """PUBLISH."""
    body = _str(topic)
    if qos:
        body += packet_id.to_bytes(2, "big")
    if version == V5:
        body += _properties(props)
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    return _packet(first, body + payload)


def encode_puback(version: int, packet_id: int, code: int = 0, kind: int = PUBACK) -> bytes:
    """PUBACK (v5: with a reason code when it is not success)."""
    first = (kind << 4) | (0x02 if kind == PUBREL else 0)
    if version == V5 and code:
        return bytes((first, 3)) + packet_id.to_bytes(2, "big") + bytes((code,))
    return bytes((first, 2)) + packet_id.to_bytes(2, "big")


def encode_suback(version: int, packet_id: int, codes: list[int]) -> bytes:
    """SUBACK."""
    props = b"\x00" if version == V5 else b""
    return _packet(0x90, packet_id.to_bytes(2, "big") + props + bytes(codes))


def encode_unsuback(version: int, packet_id: int, count: int) -> bytes:
    """UNSUBACK (v5: success for each filter)."""
    if version == V5:
        return _packet(0xB0, packet_id.to_bytes(2, "big") + b"\x00" + bytes(count))
    return _packet(0xB0, packet_id.to_bytes(2, "big"))


def encode_disconnect(version: int, code: int = 0, props: Properties | None = None) -> bytes:
    """DISCONNECT (v5 only carries the reason)."""
    if version == V5:
        return _packet(0xE0, bytes((code,)) + _properties(props))
    return b"\xe0\x00"


def encode_connect(packet: Connect) -> bytes:
    """CONNECT (client side: tests and the bench load generator)."""
    flags = 0x02 if packet.clean_start else 0
    payload = _str(packet.client_id)
    will = packet.will
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        if packet.level == V5:
            payload += _properties(will.properties)
        payload += _str(will.topic) + _bin(will.payload)
    if packet.username is not None:
        flags |= 0x80
        payload += _str(packet.username)
    if packet.password is not None:
        flags |= 0x40
        payload += _bin(packet.password)
    header = _str(packet.protocol_name) + bytes((packet.level, flags))
    header += packet.keepalive.to_bytes(2, "big")
    if packet.level == V5:
        header += _properties(packet.properties)
    return _packet(0x10, header + payload)


def encode_subscribe(version: int, packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    """SUBSCRIBE (client side)."""
    body = packet_id.to_bytes(2, "big") + (b"\x00" if version == V5 else b"")
    for topic, options in filters:
        body += _str(topic) + bytes((options,))
    return _packet(0x82, body)


def encode_unsubscribe(version: int, packet_id: int, filters: list[str]) -> bytes:
    """UNSUBSCRIBE (client side)."""
    body = packet_id.to_bytes(2, "big") + (b"\x00" if version == V5 else b"")
    for topic in filters:
        body += _str(topic)
    return _packet(0xA2, body)
