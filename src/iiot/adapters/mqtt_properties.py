"""MQTT 5 properties: the type of each property id, and reading and writing a property list."""

from __future__ import annotations

from typing import Any

from iiot.adapters.mqtt_packets import USER_PROPERTY, MalformedPacket, Properties
from iiot.adapters.mqtt_wire import Cursor, binary, string, varint

__all__ = ["read_properties", "write_properties"]

_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)
_PROPERTY_KINDS: dict[int, int] = {
    0x01: _BYTE, 0x02: _U32, 0x03: _STR, 0x08: _STR, 0x09: _BIN, 0x0B: _VARINT,
    0x11: _U32, 0x12: _STR, 0x13: _U16, 0x15: _STR, 0x16: _BIN, 0x17: _BYTE,
    0x18: _U32, 0x19: _BYTE, 0x1A: _STR, 0x1C: _STR, 0x1F: _STR, 0x21: _U16,
    0x22: _U16, 0x23: _U16, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _U32,
    0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}  # fmt: skip


def read_properties(c: Cursor) -> Properties:
    """A property list with its length; unknown or repeated properties are malformed."""
    length = c.varint()
    end = c.pos + length
    if end > c.end:
        raise MalformedPacket("properties run past the packet")
    props: Properties = {}
    while c.pos < end:
        ident = c.varint()
        kind = _PROPERTY_KINDS.get(ident)
        value: Any
        if kind is None:
            raise MalformedPacket(f"unknown property 0x{ident:02x}")
        if kind == _BYTE:
            value = c.byte()
        elif kind == _U16:
            value = c.u16()
        elif kind == _U32:
            value = c.u32()
        elif kind == _VARINT:
            value = c.varint()
        elif kind == _STR:
            value = c.text()
        elif kind == _BIN:
            value = c.binary()
        else:
            props.setdefault(USER_PROPERTY, []).append((c.text(), c.text()))
            continue
        if ident in props and ident != 0x0B:
            raise MalformedPacket(f"property 0x{ident:02x} given twice")
        props[ident] = value
    if c.pos != end:
        raise MalformedPacket("properties run past their length")
    return props


def write_properties(props: Properties | None) -> bytes:
    """A property list with its length (one zero byte when empty)."""
    if not props:
        return b"\x00"
    out = bytearray()
    for ident, value in props.items():
        kind = _PROPERTY_KINDS[ident]
        if kind == _PAIR:
            for key, val in value:
                out += varint(ident) + string(key) + string(val)
            continue
        out += varint(ident)
        if kind == _BYTE:
            out.append(value)
        elif kind == _U16:
            out += value.to_bytes(2, "big")
        elif kind == _U32:
            out += value.to_bytes(4, "big")
        elif kind == _VARINT:
            out += varint(value)
        elif kind == _STR:
            out += string(value)
        else:
            out += binary(value)
    return varint(len(out)) + bytes(out)
