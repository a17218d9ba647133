"""MQTT 3.1.1 and 5.0 packets -> bytes (the server's packets, and the client's for tests and
the bench load generator)."""

from __future__ import annotations

from iiot.adapters.mqtt_packets import PUBACK, PUBREL, V5, Connect, Properties
from iiot.adapters.mqtt_properties import write_properties
from iiot.adapters.mqtt_wire import binary, frame, string

__all__ = [
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


def encode_connack(
    version: int, code: int, session_present: bool = False, props: Properties | None = None
) -> bytes:
    """CONNACK (the code is a 3.1.1 return code or a v5 reason code, per `version`)."""
    body = bytes((1 if session_present and code == 0 else 0, code))
    if version == V5:
        body += write_properties(props)
    return frame(0x20, body)


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
    body = string(topic)
    if qos:
        body += packet_id.to_bytes(2, "big")
    if version == V5:
        body += write_properties(props)
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    return frame(first, body + payload)


def encode_puback(version: int, packet_id: int, code: int = 0, kind: int = PUBACK) -> bytes:
    """PUBACK (v5: with a reason code when it is not success)."""
    first = (kind << 4) | (0x02 if kind == PUBREL else 0)
    if version == V5 and code:
        return bytes((first, 3)) + packet_id.to_bytes(2, "big") + bytes((code,))
    return bytes((first, 2)) + packet_id.to_bytes(2, "big")


def encode_suback(version: int, packet_id: int, codes: list[int]) -> bytes:
    """SUBACK."""
    props = b"\x00" if version == V5 else b""
    return frame(0x90, packet_id.to_bytes(2, "big") + props + bytes(codes))


def encode_unsuback(version: int, packet_id: int, count: int) -> bytes:
    """UNSUBACK (v5: success for each filter)."""
    if version == V5:
        return frame(0xB0, packet_id.to_bytes(2, "big") + b"\x00" + bytes(count))
    return frame(0xB0, packet_id.to_bytes(2, "big"))


def encode_disconnect(version: int, code: int = 0, props: Properties | None = None) -> bytes:
    """DISCONNECT (v5 only carries the reason)."""
    if version == V5:
        return frame(0xE0, bytes((code,)) + write_properties(props))
    return b"\xe0\x00"


def encode_connect(packet: Connect) -> bytes:
    """CONNECT (client side: tests and the bench load generator)."""
    flags = 0x02 if packet.clean_start else 0
    payload = string(packet.client_id)
    will = packet.will
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        if packet.level == V5:
            payload += write_properties(will.properties)
        payload += string(will.topic) + binary(will.payload)
    if packet.username is not None:
        flags |= 0x80
        payload += string(packet.username)
    if packet.password is not None:
        flags |= 0x40
        payload += binary(packet.password)
    header = string(packet.protocol_name) + bytes((packet.level, flags))
    header += packet.keepalive.to_bytes(2, "big")
    if packet.level == V5:
        header += write_properties(packet.properties)
    return frame(0x10, header + payload)


def encode_subscribe(version: int, packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    """SUBSCRIBE (client side)."""
    body = packet_id.to_bytes(2, "big") + (b"\x00" if version == V5 else b"")
    for topic, options in filters:
        body += string(topic) + bytes((options,))
    return frame(0x82, body)


def encode_unsubscribe(version: int, packet_id: int, filters: list[str]) -> bytes:
    """UNSUBSCRIBE (client side)."""
    body = packet_id.to_bytes(2, "big") + (b"\x00" if version == V5 else b"")
    for topic in filters:
        body += string(topic)
    return frame(0xA2, body)
