"""MQTT packets as values: protocol versions, packet types, v5 property ids, the errors of
the codec and one dataclass per packet (shared by `mqtt_decode` and `mqtt_encode`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

V311, V5 = 4, 5

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)

PINGRESP_BYTES = b"\xd0\x00"
PINGREQ_BYTES = b"\xc0\x00"


class MalformedPacket(Exception):
    """The bytes are not a valid MQTT packet (v5 reason code 0x81)."""


class PacketTooLarge(MalformedPacket):
    """A packet larger than the announced maximum (v5 reason code 0x95)."""


# --- v5 property ids ------------------------------------------------------------------------
USER_PROPERTY = 0x26
SESSION_EXPIRY, RECEIVE_MAXIMUM, MAXIMUM_PACKET_SIZE = 0x11, 0x21, 0x27
ASSIGNED_CLIENT_ID, SERVER_KEEP_ALIVE, REASON_STRING = 0x12, 0x13, 0x1F
MAXIMUM_QOS, RETAIN_AVAILABLE, TOPIC_ALIAS_MAXIMUM, TOPIC_ALIAS = 0x24, 0x25, 0x22, 0x23
WILDCARD_AVAILABLE, SUB_IDS_AVAILABLE, SHARED_AVAILABLE = 0x28, 0x29, 0x2A
AUTH_METHOD = 0x15
WILL_DELAY_INTERVAL = 0x18

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
