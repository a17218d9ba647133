"""Hypothesis-generated hostile telemetry payloads, each invalid by construction, and the
steady stream of good messages sent beside them."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

__all__ = ["TS", "good_body", "hostile_payloads"]

TS = 1_767_225_600_000

_bad_char = st.sampled_from(["\x00", "\ud800", "\udbff", "\udc00", "\udfff"])
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))


@st.composite
def _bad_text(draw: Any) -> str:
    before, after = draw(_text), draw(_text)
    return before + draw(_bad_char) + after


def _dumps(document: Any) -> bytes:
    return json.dumps(document).encode()  # escapes NUL and surrogates as \\uXXXX


def _strategy(max_bytes: int) -> st.SearchStrategy[bytes]:
    valid_value = st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.booleans()
    families = [
        # not UTF-8
        st.binary(max_size=200).map(lambda b: b"\xff" + b),
        # NUL or a lone surrogate in a key or a string value
        st.builds(lambda k, v: _dumps({k: v}), _bad_text(), valid_value),
        st.builds(lambda k, v: _dumps({k or "k": v}), _text, _bad_text()),
        st.builds(lambda v: _dumps([{"ts": TS, "values": {"k": v}}]), _bad_text()),
        # an integer too long to convert
        st.integers(4301, 6000).map(lambda n: b'{"a": ' + b"7" * n + b"}"),
        # nested far too deeply
        st.integers(2000, 20000).map(lambda n: b'{"a": ' + b"[" * n + b"]" * n + b"}"),
        # ts in seconds, negative, or beyond year 9999
        st.builds(
            lambda ts: _dumps({"ts": ts, "values": {"t": 1}}),
            st.integers(-(2**62), 999_999_999_999) | st.integers(253_402_300_800_000, 2**62),
        ),
        # keys out of range
        st.integers(256, 600).map(lambda n: _dumps({"k" * n: 1})),
        st.just(b'{"": 1}'),
        # NaN / Infinity literals, truncated documents, not an object
        st.sampled_from([b'{"t": NaN}', b'{"t": -Infinity}', b'{"t": 1e999}']),
        st.builds(
            lambda d, cut: _dumps(d)[: max(1, len(_dumps(d)) - cut)],
            st.dictionaries(st.text(min_size=1, max_size=8), valid_value, min_size=1),
            st.integers(1, 3),
        ),
        st.sampled_from([b"", b"null", b"42", b'"x"', b"[]", b"{}", b"[1]", b"[[]]"]),
    ]
    return st.one_of(families).filter(lambda b: len(b) <= max_bytes and b != b"{}")


def hostile_payloads(count: int, max_bytes: int = 64 * 1024) -> list[bytes]:
    """`count` hostile payloads (reproducible: derandomized)."""
    found: list[bytes] = []

    @settings(
        max_examples=count,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @given(_strategy(max_bytes))
    def collect(payload: bytes) -> None:
        if len(found) < count:
            found.append(payload)

    collect()
    return found


def good_body(seq: int) -> bytes:
    """A good message with an explicit ts (so exact storage can be checked)."""
    return _dumps({"ts": TS + seq, "values": {"seq": seq, "ok": True}})
