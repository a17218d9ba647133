"""SenML JSON (RFC 8428) parsing: examples from the RFC, the limits, and fuzzing."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iiot.codec import Limits
from iiot.errors import InvalidPayload, PayloadTooLarge
from iiot.model import Point
from iiot.senml import parse_senml

NOW = 1_767_225_600_000
LIMITS = Limits()


def parse(pack: object, limits: Limits = LIMITS) -> list[Point]:
    return parse_senml(json.dumps(pack).encode(), NOW, limits)


def test_base_name_time_and_relative_times() -> None:
    # RFC 8428 section 5.1.2 style: base name and base time, times relative to it.
    pack = [
        {"bn": "urn:dev:ow:10e2073a01080063:", "bt": 1.320067464e9, "n": "voltage", "v": 120.1},
        {"n": "current", "t": -5, "v": 1.2},
        {"n": "current", "t": -4, "v": 1.3},
    ]
    assert parse(pack) == [
        Point("urn:dev:ow:10e2073a01080063:voltage", 1_320_067_464_000, 120.1),
        Point("urn:dev:ow:10e2073a01080063:current", 1_320_067_459_000, 1.2),
        Point("urn:dev:ow:10e2073a01080063:current", 1_320_067_460_000, 1.3),
    ]


def test_times_below_2_pow_28_are_relative_to_receipt() -> None:
    assert parse([{"n": "a", "v": 1}, {"n": "b", "v": 2, "t": -1.5}]) == [
        Point("a", NOW, 1),
        Point("b", NOW - 1500, 2),
    ]


def test_value_kinds_base_value_and_sum() -> None:
    pack = [
        {"bn": "m/", "bv": 10, "bs": 100, "n": "temp", "v": 1.5, "u": "Cel"},
        {"n": "on", "vb": True},
        {"n": "mode", "vs": "auto"},
        {"n": "blob", "vd": "aGVsbG8"},
        {"n": "energy", "s": 5},
    ]
    assert parse(pack) == [
        Point("m/temp", NOW, 11.5),
        Point("m/on", NOW, True),
        Point("m/mode", NOW, "auto"),
        Point("m/blob", NOW, "aGVsbG8"),
        Point("m/energy_sum", NOW, 105),
    ]


def test_base_fields_carry_forward_until_replaced() -> None:
    pack = [{"bn": "a:", "bt": 1.7e9}, {"n": "x", "v": 1}, {"bn": "b:", "n": "x", "v": 2}]
    assert parse(pack) == [Point("a:x", 1_700_000_000_000, 1), Point("b:x", 1_700_000_000_000, 2)]


@pytest.mark.parametrize(
    ("pack", "message"),
    [
        ({"n": "a", "v": 1}, "JSON array"),
        ([], "empty"),
        ([1], "must be a JSON object"),
        ([{"v": 1}], "no name"),
        ([{"n": "a"}], "no value"),
        ([{"n": "a", "v": 1, "vs": "x"}], "more than one value field"),
        ([{"n": "a", "v": "1"}], "v must be a number"),
        ([{"n": "a", "v": True}], "v must be a number"),
        ([{"n": "a", "vb": 1}], "vb must be true or false"),
        ([{"n": "a", "vs": 1}], "vs must be a string"),
        ([{"n": "a", "vd": "a=="}], "base64url"),
        ([{"n": " bad", "v": 1}], "not a valid SenML name"),
        ([{"n": "a" * 256, "v": 1}], "1 to 255 characters"),
        ([{"n": "a", "v": 1, "t": 1e300}], "outside the range"),
        ([{"n": "a", "v": 1, "t": -2e9}], "outside the range"),
        ([{"bver": 11, "n": "a", "v": 1}], "version 11 is not supported"),
        ([{"n": "a", "v": 1, "foo_": 1}], "must be understood"),
        ([{"n": "a", "v": 1e308, "bv": 1e308}], "out of range"),
        ([{"n": "a", "v": 10**400}], "out of range"),
        ([{"bn": "a"}], "holds no values"),
    ],
)
def test_invalid_packs_are_refused_with_a_clear_message(pack: object, message: str) -> None:
    with pytest.raises(InvalidPayload, match=message):
        parse(pack)


def test_limits_are_the_codec_limits() -> None:
    with pytest.raises(PayloadTooLarge):
        parse_senml(b"[" + b" " * 300 + b"]", NOW, Limits(max_bytes=100))
    with pytest.raises(InvalidPayload, match="more than 2 points"):
        parse([{"n": "a", "v": 1}] * 3, Limits(max_points=2))
    with pytest.raises(InvalidPayload, match="not a valid JSON number"):
        parse_senml(b'[{"n": "a", "v": NaN}]', NOW, LIMITS)
    with pytest.raises(InvalidPayload, match="UTF-8"):
        parse_senml(b"\xff", NOW, LIMITS)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
_field = st.sampled_from(
    ["bn", "bt", "bu", "bv", "bs", "bver", "n", "u", "v", "vs", "vb", "vd", "s", "t", "ut", "x_"]
)
_record = st.dictionaries(_field, _json, max_size=6)


@settings(max_examples=400, deadline=None)
@given(st.lists(_record, max_size=6) | _json)
def test_any_json_parses_or_is_refused_as_invalid(document: object) -> None:
    try:
        points = parse(document)
    except InvalidPayload:
        return
    assert points and all(isinstance(point, Point) for point in points)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_parse_or_are_refused_as_invalid(body: bytes) -> None:
    with contextlib.suppress(InvalidPayload):
        parse_senml(body, NOW, LIMITS)
