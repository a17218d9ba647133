"""The MQTT codec against paho's encoder (both versions), and malformed input."""

from __future__ import annotations

import paho.mqtt.client as paho
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from iiot.adapters import mqtt_codec as mc

topics = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"),
    min_size=1,
    max_size=80,
)
payloads = st.binary(max_size=3000)
names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=10
)


def _paho(version: int) -> paho.Client:
    protocol = paho.MQTTv5 if version == mc.V5 else paho.MQTTv311
    return _unconnected(
        paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=protocol)
    )


class _NoSocket:
    def close(self) -> None:
        pass


def _unconnected(client: paho.Client) -> paho.Client:
    """A paho client whose encoded packets stay in its output queue (no socket)."""
    client._on_socket_register_write = lambda *args: None
    client._sock = _NoSocket()  # paho only encodes for a connected client; never written to
    return client


def _queued(client: paho.Client) -> bytes:
    return bytes(client._out_packet.pop()["packet"])


@settings(max_examples=300, deadline=None)
@given(
    version=st.sampled_from([mc.V311, mc.V5]),
    topic=topics,
    payload=payloads,
    qos=st.sampled_from([0, 1, 2]),
    retain=st.booleans(),
    dup=st.booleans(),
    mid=st.integers(1, 65535),
    expiry=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    user=st.lists(st.tuples(names, names), max_size=3),
)
def test_publish_from_paho_decodes(version, topic, payload, qos, retain, dup, mid, expiry, user):
    client = _paho(version)
    props = None
    if version == mc.V5 and (expiry is not None or user):
        props = Properties(PacketTypes.PUBLISH)
        if expiry is not None:
            props.MessageExpiryInterval = expiry
        if user:
            props.UserProperty = user
    client._send_publish(mid, topic.encode(), payload, qos, retain, dup, None, props)
    raw = _queued(client)
    packet = mc.decode_one(raw, version)
    assert isinstance(packet, mc.Publish)
    assert (packet.topic, packet.payload, packet.qos, packet.retain) == (
        topic,
        payload,
        qos,
        retain,
    )
    assert packet.dup == (dup and qos > 0) or packet.dup == dup
    assert packet.packet_id == (mid if qos else 0)
    if expiry is not None and version == mc.V5:
        assert packet.properties[0x02] == expiry
    if user and version == mc.V5:
        assert packet.properties[mc.USER_PROPERTY] == user
    # Our encoder gives the same bytes back (paho encodes properties in the same order
    # only for a single property, so compare without them).
    if not props:
        again = mc.encode_publish(version, topic, payload, qos, mid if qos else 0, retain, dup)
        assert again == raw


@settings(max_examples=150, deadline=None)
@given(
    version=st.sampled_from([mc.V311, mc.V5]),
    client_id=st.text(alphabet="abcdefghij0123456789-", min_size=1, max_size=23),
    username=st.one_of(st.none(), names.filter(bool)),
    password=st.one_of(st.none(), names.filter(bool)),
    keepalive=st.integers(0, 65535),
    clean=st.booleans(),
    will=st.one_of(st.none(), st.tuples(topics, payloads, st.sampled_from([0, 1]))),
)
def test_connect_from_paho_decodes(version, client_id, username, password, keepalive, clean, will):
    protocol = paho.MQTTv5 if version == mc.V5 else paho.MQTTv311
    kwargs = {} if version == mc.V5 else {"clean_session": clean}
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        **kwargs,
    )
    _unconnected(client)
    if version == mc.V5:
        client._clean_start = clean
    if username is not None:
        client.username_pw_set(username, password)
    if will is not None:
        client.will_set(will[0], will[1], will[2])
    client._send_connect(keepalive)
    packet = mc.decode_one(_queued(client), version)
    assert isinstance(packet, mc.Connect)
    assert (packet.level, packet.client_id, packet.keepalive) == (version, client_id, keepalive)
    assert packet.clean_start == clean
    assert packet.username == username
    assert packet.password == (password.encode() if username is not None and password else None)
    if will is None:
        assert packet.will is None
    else:
        assert packet.will is not None
        assert (packet.will.topic, packet.will.payload, packet.will.qos) == will


@settings(max_examples=100, deadline=None)
@given(
    version=st.sampled_from([mc.V311, mc.V5]),
    filters=st.lists(st.tuples(topics, st.sampled_from([0, 1, 2])), min_size=1, max_size=5),
)
def test_subscribe_and_unsubscribe_from_paho_decode(version, filters):
    client = _paho(version)
    options = [SubscribeOptions(qos=q) if version == mc.V5 else q for _, q in filters]
    client._send_subscribe(
        False, [(t.encode(), o) for (t, _), o in zip(filters, options, strict=True)]
    )
    packet = mc.decode_one(_queued(client), version)
    assert isinstance(packet, mc.Subscribe)
    assert [(t, o & 0x03) for t, o in packet.filters] == filters
    client._send_unsubscribe(False, [t.encode() for t, _ in filters])
    packet = mc.decode_one(_queued(client), version)
    assert isinstance(packet, mc.Unsubscribe)
    assert packet.filters == [t for t, _ in filters]


@settings(max_examples=300, deadline=None)
@given(version=st.sampled_from([mc.V311, mc.V5]), data=st.binary(max_size=300))
def test_garbage_is_malformed_or_incomplete_never_another_error(version, data):
    reader = mc.Reader(1024, version)
    try:
        reader.feed(data)
    except mc.MalformedPacket:
        return
    assert reader.buffered() <= len(data)


def test_oversize_is_refused_from_the_fixed_header_alone():
    reader = mc.Reader(100)
    header = b"\x30" + bytes([0x80, 0x80, 0x01])  # PUBLISH of 16384 bytes, none of them sent
    try:
        reader.feed(header)
    except mc.PacketTooLarge as exc:
        assert "16388" in str(exc) and "100" in str(exc)
    else:
        raise AssertionError("oversize packet not refused")


def test_truncated_packets_wait_for_the_rest():
    raw = mc.encode_publish(mc.V5, "devices/x/telemetry", b'{"a":1}', 1, 7)
    reader = mc.Reader(1024, mc.V5)
    assert reader.feed(raw[:5]) == []
    [packet] = reader.feed(raw[5:])
    assert isinstance(packet, mc.Publish) and packet.packet_id == 7
