"""MQTT primitive data types (integers, variable byte integers, strings, binary data):
`Cursor` reads them from one packet body, the functions below write them."""

from __future__ import annotations

import struct

from iiot.adapters.mqtt_packets import MalformedPacket

__all__ = ["Cursor", "binary", "frame", "string", "varint"]


class Cursor:
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


def varint(value: int) -> bytes:
    """A variable byte integer."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def string(value: str) -> bytes:
    """A UTF-8 string with its length."""
    raw = value.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def binary(value: bytes) -> bytes:
    """Binary data with its length."""
    return len(value).to_bytes(2, "big") + value


def frame(first: int, body: bytes) -> bytes:
    """A whole packet: the first byte, the remaining length, the body."""
    return bytes((first,)) + varint(len(body)) + body
