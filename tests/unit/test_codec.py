"""The payload codec: the three contract forms, limits, and errors that say what is wrong."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iiot.codec import MAX_KEY_LENGTH, MIN_TS, Limits, parse_telemetry
from iiot.errors import InvalidPayload, PayloadTooLarge
from iiot.model import Point

NOW = 1_767_225_600_000


def test_form_1_values_are_stamped_with_receipt_time() -> None:
    points = parse_telemetry(b'{"temperature": 21.5, "running": true, "mode": "auto"}', NOW)
    assert points == [
        Point("temperature", NOW, 21.5),
        Point("running", NOW, True),
        Point("mode", NOW, "auto"),
    ]


def test_form_2_uses_the_given_timestamp() -> None:
    points = parse_telemetry(b'{"ts": 1767225600123, "values": {"temperature": 21}}', NOW)
    assert points == [Point("temperature", 1767225600123, 21)]


def test_form_3_array_mixes_both_forms() -> None:
    body = b'[{"ts": 1767225601000, "values": {"a": 1}}, {"b": false}]'
    assert parse_telemetry(body, NOW) == [Point("a", 1767225601000, 1), Point("b", NOW, False)]


def test_other_json_values_are_kept_as_json_text() -> None:
    points = parse_telemetry(b'{"obj": {"x": [1, 2]}, "none": null, "list": [true]}', NOW)
    assert [p.value for p in points] == ['{"x":[1,2]}', "null", "[true]"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"a": 1', "line 1 column 8"),
        (b"[]", "empty array"),
        (b'{"ts": 1767225600000, "values": {}}', "no values"),
        (b'"text"', "must be a JSON object"),
        (b"[1]", "item [0] must be a JSON object"),
        (b'{"ts": "soon", "values": {"a": 1}}', "ts must be an integer"),
        (b'{"ts": -1, "values": {"a": 1}}', "out of range"),
        (b'{"ts": 1767225600001, "values": [1]}', "values must be a JSON object"),
        (b'{"ts": 1767225600001, "values": {"a": 1}, "extra": 2}', "may not also have"),
        (b'{"a": NaN}', "NaN is not a valid JSON number"),
        (b'{"a": 1e999}', "out of range"),
        (b'{"": 1}', "keys must be 1 to 255"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b'[{"a": 1}, {"ts": true, "values": {"b": 1}}]', "[1].ts must be an integer"),
    ],
)
def test_invalid_messages_say_what_is_wrong(body: bytes, fragment: str) -> None:
    with pytest.raises(InvalidPayload) as caught:
        parse_telemetry(body, NOW)
    assert fragment in str(caught.value)


def test_key_length_limit_is_inclusive() -> None:
    longest = "k" * MAX_KEY_LENGTH
    assert parse_telemetry(json.dumps({longest: 1}).encode(), NOW)[0].key == longest
    with pytest.raises(InvalidPayload, match="256 characters"):
        parse_telemetry(json.dumps({longest + "k": 1}).encode(), NOW)


def test_size_limit_refuses_large_messages() -> None:
    body = json.dumps({"k": "x" * 200}).encode()
    with pytest.raises(PayloadTooLarge, match="limit is 100 bytes"):
        parse_telemetry(body, NOW, Limits(max_bytes=100))


def test_points_limit_counts_across_items() -> None:
    body = json.dumps([{"a": 1, "b": 2}, {"c": 3, "d": 4}]).encode()
    assert len(parse_telemetry(body, NOW, Limits(max_points=4))) == 4
    with pytest.raises(InvalidPayload, match="more than 3 points"):
        parse_telemetry(body, NOW, Limits(max_points=3))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_the_codec_error(body: bytes) -> None:
    try:
        points = parse_telemetry(body, NOW)
    except InvalidPayload:
        return
    assert all(isinstance(p, Point) for p in points)


@settings(max_examples=300)
@given(json_values)
def test_any_json_document_parses_or_raises_the_codec_error(document: object) -> None:
    body = json.dumps(document).encode()
    try:
        points = parse_telemetry(body, NOW)
    except InvalidPayload:
        return
    assert points or document == {}, "a message that parses holds a point, or is `{}`"
    for point in points:
        assert 1 <= len(point.key) <= MAX_KEY_LENGTH
        assert isinstance(point.value, (bool, int, float, str))


# Storable text: no NUL and no lone surrogates (the codec refuses those).
storable = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.text(storable, min_size=1, max_size=MAX_KEY_LENGTH),
        st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(storable),
        min_size=1,
        max_size=20,
    ),
    st.integers(min_value=MIN_TS, max_value=2**45),
)
def test_valid_messages_round_trip(values: dict[str, object], ts: int) -> None:
    body = json.dumps({"ts": ts, "values": values}).encode()
    points = parse_telemetry(body, NOW)
    assert {p.key: p.value for p in points} == values
    assert {p.ts for p in points} == {ts}


def test_an_empty_object_is_an_empty_message() -> None:
    # ThingsBoard's SDKs send `{}` to check the connection: accepted, nothing stored.
    assert parse_telemetry(b"{}", 1_767_225_600_000, Limits()) == []
