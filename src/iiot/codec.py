"""The one telemetry payload parser for every protocol: pure functions, no I/O.

Accepted forms (JSON, UTF-8):
1. `{"temperature": 21.5, "running": true}`          timestamp = time of receipt
2. `{"ts": 1767225600000, "values": {...}}`          `ts` in Unix milliseconds
3. a JSON array of items of form 1 or 2.

A message that breaks any rule raises `InvalidPayload` (or `PayloadTooLarge`) saying what is
wrong and where; nothing of it is stored.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

from iiot.errors import InvalidPayload, PayloadTooLarge
from iiot.model import Point, Scalar

__all__ = [
    "MAX_KEY_LENGTH",
    "MAX_TS",
    "MIN_TS",
    "Limits",
    "check_size",
    "check_text",
    "parse_telemetry",
]

MAX_KEY_LENGTH = 255
# Largest ts we accept: year 9999 in Unix ms (beyond that, clients are sending micro/nanoseconds).
MAX_TS = 253_402_300_799_999
# Smallest ts we accept: 2001-09-09 in Unix ms. Anything below can only be seconds (or
# a clock that was never set); storing it as milliseconds would file it under 1970.
MIN_TS = 1_000_000_000_000
_INT64_LIMIT = 2.0**63  # orjson reads integer literals from here on as floats


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-message limits; configurable through settings."""

    max_bytes: int = 256 * 1024
    max_points: int = 10_000


def _refuse_constant(name: str) -> Any:
    raise InvalidPayload(f"{name} is not a valid JSON number")


def check_size(body: bytes, limits: Limits) -> None:
    """Raise `PayloadTooLarge` when the message exceeds the size limit."""
    if len(body) > limits.max_bytes:
        raise PayloadTooLarge(
            f"message is {len(body)} bytes; the limit is {limits.max_bytes} bytes"
        )


def decode_json(body: bytes | str) -> Any:
    """Decode UTF-8 JSON, refusing NaN/Infinity, with the error position in the message.

    The standard library: it reads integers of any size and names the position of an
    error. (`parse_telemetry` tries orjson first.)
    """
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
    except UnicodeDecodeError as exc:
        raise InvalidPayload(f"message is not valid UTF-8 at byte {exc.start}") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise InvalidPayload(
            f"invalid JSON at line {exc.lineno} column {exc.colno} (char {exc.pos}): {exc.msg}"
        ) from None
    except RecursionError:
        raise InvalidPayload("invalid JSON: nested too deeply") from None
    except ValueError as exc:
        # e.g. an integer literal of thousands of digits (Python's conversion limit)
        raise InvalidPayload(f"invalid JSON: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).split(";")[0].splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


# What PostgreSQL's text type refuses, and what no UTF-8 encoder can write: NUL and lone
# surrogates (only reachable through JSON's \u escapes).
_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")


def check_text(points: list[Point]) -> None:
    """Refuse keys and string values holding NUL or a lone surrogate (storage cannot hold them)."""
    search = _BAD_TEXT.search
    for point in points:
        found = search(point.key)
        if found is not None:
            raise InvalidPayload(
                f"key {_shown(point.key)} holds {_char_name(found.group())}: "
                "keys and strings may not contain NUL or lone surrogates"
            )
        value = point.value
        if type(value) is str:
            found = search(value)
            if found is not None:
                raise InvalidPayload(
                    f"value of key {_shown(point.key)} holds {_char_name(found.group())}: "
                    "strings may not contain NUL or lone surrogates"
                )


def _char_name(char: str) -> str:
    return (
        "a NUL character (\\u0000)" if char == "\x00" else f"a lone surrogate (\\u{ord(char):04x})"
    )


def _shown(text: str) -> str:
    short = text if len(text) <= 40 else text[:40] + "..."
    return ascii(short)


def parse_telemetry(body: bytes | str, received_ms: int, limits: Limits = Limits()) -> list[Point]:
    """Parse a telemetry message into points; `received_ms` stamps values without `ts`."""
    if isinstance(body, bytes):
        check_size(body, limits)
    # orjson first: several times faster, and every message of every protocol comes
    # through here. It reads integers beyond 64 bits as floats, so a message that may hold
    # one (an integral float that large, or a nested array or object, kept as JSON text)
    # is read again, like anything orjson refuses, by the standard library.
    try:
        points = _parse_document(orjson.loads(body), received_ms, limits, exact=False)
    except (orjson.JSONDecodeError, _NotExact):
        points = _parse_document(decode_json(body), received_ms, limits, exact=True)
    # NUL and lone surrogates only arrive as \u escapes (raw ones are invalid JSON or
    # UTF-8), so a message without any escape skips the scan.
    if (b"\\u" in body) if isinstance(body, bytes) else True:
        check_text(points)
    return points


class _NotExact(Exception):
    """orjson may have read this message differently from the standard library."""


def _parse_document(document: Any, received_ms: int, limits: Limits, exact: bool) -> list[Point]:
    points: list[Point] = []
    if type(document) is dict and not document:
        return points  # `{}`: ThingsBoard's SDKs send it to check the connection
    if isinstance(document, list):
        if not document:
            raise InvalidPayload("message is an empty array: it holds no values")
        for index, item in enumerate(document):
            _parse_item(item, f"[{index}]", received_ms, points, limits, exact)
    else:
        _parse_item(document, "", received_ms, points, limits, exact)
    return points


def _parse_item(
    item: Any, where: str, received_ms: int, out: list[Point], limits: Limits, exact: bool
) -> None:
    # Runs for every message: the error texts are only built when there is an error.
    if type(item) is not dict:
        raise InvalidPayload(f"{_label(where)} must be a JSON object, not {_json_type(item)}")
    if "ts" in item and "values" in item:
        if len(item) != 2:
            extra = set(item) - {"ts", "values"}
            raise InvalidPayload(
                f"{_label(where)} has 'ts' and 'values', so it may not also have {sorted(extra)}"
            )
        ts = _parse_ts(item["ts"], f"{where}.ts" if where else "ts")
        values = item["values"]
        if type(values) is not dict:
            raise InvalidPayload(
                f"{where}.values must be a JSON object, not {_json_type(values)}"
                if where
                else f"values must be a JSON object, not {_json_type(values)}"
            )
        in_values = True
    else:
        ts = received_ms
        values = item
        in_values = False
    if not values:
        raise InvalidPayload(f"{_label(where)} holds no values")
    if len(out) + len(values) > limits.max_points:
        raise InvalidPayload(
            f"message holds more than {limits.max_points} points (the limit per message)"
        )
    append = out.append
    for key, raw in values.items():
        if not 1 <= len(key) <= MAX_KEY_LENGTH:
            prefix = (f"{where}.values" if where else "values") if in_values else where
            shown = key if len(key) <= 40 else key[:40] + "..."
            raise InvalidPayload(
                f"key {shown!r} at {prefix or 'top level'} is {len(key)} characters; "
                f"keys must be 1 to {MAX_KEY_LENGTH} characters"
            )
        kind = type(raw)
        if kind is float:
            if not exact and abs(raw) >= _INT64_LIMIT and raw.is_integer():
                raise _NotExact
            if not math.isfinite(raw):  # e.g. 1e999 overflows to inf
                raise InvalidPayload(f"number {raw!r} is out of range")
        elif kind is not int and kind is not bool and kind is not str:
            if not exact and raw is not None:
                raise _NotExact
            raw = _to_scalar(raw)
        append(Point(key, ts, raw))


def _label(where: str) -> str:
    return f"item {where}" if where else "message"


def _parse_ts(raw: Any, where: str) -> int:
    if type(raw) is int and MIN_TS <= raw <= MAX_TS:
        return raw
    if isinstance(raw, bool) or not isinstance(raw, int):
        if isinstance(raw, float) and raw.is_integer():
            raw = int(raw)
        else:
            raise InvalidPayload(
                f"{where} must be an integer of Unix milliseconds, not {_json_type(raw)} {raw!r}"
            )
    if 0 <= raw < MIN_TS:
        raise InvalidPayload(
            f"{where}={raw} looks like seconds: ts must be Unix milliseconds "
            f"(from {MIN_TS}, 2001-09-09, to {MAX_TS})"
        )
    if not MIN_TS <= raw <= MAX_TS:
        raise InvalidPayload(
            f"{where}={raw} is out of range: expected Unix milliseconds from {MIN_TS} to {MAX_TS}"
        )
    return int(raw)


def _to_scalar(raw: Any) -> Scalar:
    if isinstance(raw, (bool, str, int)):
        return raw
    if isinstance(raw, float):
        if not math.isfinite(raw):  # e.g. 1e999 overflows to inf
            raise InvalidPayload(f"number {raw!r} is out of range")
        return raw
    # Objects, arrays and null are kept as their compact JSON text.
    return json.dumps(raw, separators=(",", ":"), ensure_ascii=False)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
