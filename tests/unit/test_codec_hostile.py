"""Hostile payloads the codec must refuse cleanly: huge integers, NUL, lone surrogates,
and timestamps in seconds."""

from __future__ import annotations

import pytest

from iiot.codec import MIN_TS, Limits, parse_telemetry
from iiot.errors import InvalidPayload
from iiot.senml import parse_senml

NOW = 1_767_225_600_000


def test_integer_of_5000_digits_is_invalid_payload() -> None:
    with pytest.raises(InvalidPayload, match="invalid JSON"):
        parse_telemetry(b'{"a": ' + b"1" * 5000 + b"}", NOW)


@pytest.mark.parametrize(
    ("body", "what"),
    [
        (b'{"a\\u0000b": 1}', "NUL"),
        (b'{"a": "x\\u0000y"}', "NUL"),
        (b'{"\\ud800": 1}', "surrogate"),
        (b'{"a": "\\ud800"}', "surrogate"),
        (b'{"a": "\\udfff tail"}', "surrogate"),
        (b'{"a": ["\\ud800"]}', "surrogate"),
        (b'[{"ts": 1767225600000, "values": {"k": "\\u0000"}}]', "NUL"),
    ],
)
def test_nul_and_lone_surrogates_are_refused(body: bytes, what: str) -> None:
    with pytest.raises(InvalidPayload, match=what):
        parse_telemetry(body, NOW)


def test_escaped_text_that_is_fine_is_kept() -> None:
    points = parse_telemetry(b'{"a": "caf\\u00e9 \\ud83d\\ude00", "b\\\\u0000": 1}', NOW)
    assert [(p.key, p.value) for p in points] == [("a", "café 😀"), ("b\\u0000", 1)]


def test_text_body_with_surrogate_is_refused() -> None:
    with pytest.raises(InvalidPayload, match="surrogate"):
        parse_telemetry('{"a": "\ud800"}', NOW)


def test_senml_refuses_nul_and_surrogates() -> None:
    with pytest.raises(InvalidPayload, match="not a valid SenML name"):
        parse_senml(b'[{"n": "a\\u0000", "v": 1}]', NOW, Limits())
    for body in (b'[{"n": "a", "vs": "\\ud800"}]', b'[{"n": "a", "vs": "x\\u0000"}]'):
        with pytest.raises(InvalidPayload, match=r"NUL|surrogate"):
            parse_senml(body, NOW, Limits())


@pytest.mark.parametrize("ts", [0, 1, 1_700_000_000, MIN_TS - 1])
def test_ts_in_seconds_is_refused(ts: int) -> None:
    with pytest.raises(InvalidPayload, match="looks like seconds"):
        parse_telemetry(f'{{"ts": {ts}, "values": {{"t": 1}}}}'.encode(), NOW)


def test_ts_from_2001_is_accepted() -> None:
    points = parse_telemetry(f'{{"ts": {MIN_TS}, "values": {{"t": 1}}}}'.encode(), NOW)
    assert points[0].ts == MIN_TS
