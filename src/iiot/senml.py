"""SenML JSON (RFC 8428, `application/senml+json`, CoAP content-format 110) as a payload format.

A pack is a JSON array of records. Base fields (`bn`, `bt`, `bv`, `bs`, `bver`) apply to their
record and every later record until another record sets them again. Each resolved record
becomes one point: key = `bn` + `n`, ts = (`bt` + `t`) in Unix ms, value = `v` (+ `bv`), `vs`,
`vb` or `vd`. A sum (`s` + `bs`) is stored under the key `{name}_sum`. Times below 2**28 are
relative to the time of receipt (RFC 8428 section 4.5.3), so `t: -60` means a minute ago.
Units (`u`, `bu`) and update times (`ut`) are accepted but not stored.

Like the JSON codec, a pack that breaks any rule raises `InvalidPayload` naming the record and
field, and nothing of it is stored.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import Any

from iiot.codec import MAX_KEY_LENGTH, MAX_TS, Limits, check_size, check_text, decode_json
from iiot.errors import InvalidPayload
from iiot.model import Point, Scalar

__all__ = ["SENML_VERSION", "SUM_SUFFIX", "parse_senml"]

SENML_VERSION = 10  # the version RFC 8428 defines; a pack declaring a newer one is refused
SUM_SUFFIX = "_sum"
# RFC 8428 section 4.5.3: smaller times are relative to now (about 8.5 years, in seconds).
_RELATIVE_LIMIT = 2**28
# RFC 8428 section 4.5.1: the characters a resolved name may hold, starting with a letter/digit.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-:./_]*")

_STRING_FIELDS = ("bn", "bu", "n", "u", "vs", "vd")
_NUMBER_FIELDS = ("bt", "bv", "bs", "t", "v", "s", "ut")
_VALUE_FIELDS = ("v", "vs", "vb", "vd")


def parse_senml(body: bytes, received_ms: int, limits: Limits) -> list[Point]:
    """Parse a SenML JSON pack into points; relative times count from `received_ms`."""
    check_size(body, limits)
    pack = decode_json(body)
    if not isinstance(pack, list):
        raise InvalidPayload("a SenML pack must be a JSON array of records")
    if not pack:
        raise InvalidPayload("SenML pack is an empty array: it holds no records")
    base = _Base()
    points: list[Point] = []
    for index, record in enumerate(pack):
        where = f"record [{index}]"
        if not isinstance(record, dict):
            raise InvalidPayload(f"{where} must be a JSON object")
        _check_fields(record, where)
        base.update(record, where)
        points.extend(_resolve(record, base, where, received_ms))
        if len(points) > limits.max_points:
            raise InvalidPayload(
                f"message holds more than {limits.max_points} points (the limit per message)"
            )
    if not points:
        raise InvalidPayload("SenML pack holds no values")
    check_text(points)
    return points


class _Base:
    """The base fields in force while walking through a pack."""

    __slots__ = ("name", "sum", "time", "value")

    def __init__(self) -> None:
        self.name = ""
        self.time = 0.0
        self.value = 0.0
        self.sum = 0.0

    def update(self, record: dict[str, Any], where: str) -> None:
        if "bver" in record:
            version = record["bver"]
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise InvalidPayload(f"{where}: bver must be a positive integer")
            if version > SENML_VERSION:
                raise InvalidPayload(
                    f"{where}: SenML version {version} is not supported "
                    f"(this platform understands version {SENML_VERSION})"
                )
        if "bn" in record:
            self.name = record["bn"]
        if "bt" in record:
            self.time = _number(record["bt"], where, "bt")
        if "bv" in record:
            self.value = _number(record["bv"], where, "bv")
        if "bs" in record:
            self.sum = _number(record["bs"], where, "bs")


def _check_fields(record: dict[str, Any], where: str) -> None:
    for label in record:
        # RFC 8428 section 4.4: labels ending in "_" must be understood, or the pack refused.
        if label.endswith("_"):
            raise InvalidPayload(f"{where}: field {label!r} must be understood but is not known")
    for label in _STRING_FIELDS:
        if label in record and not isinstance(record[label], str):
            raise InvalidPayload(f"{where}: {label} must be a string")
    for label in _NUMBER_FIELDS:
        if label in record:
            _number(record[label], where, label)
    if "vb" in record and not isinstance(record["vb"], bool):
        raise InvalidPayload(f"{where}: vb must be true or false")
    present = [label for label in _VALUE_FIELDS if label in record]
    if len(present) > 1:
        raise InvalidPayload(f"{where} has more than one value field: {', '.join(present)}")


def _resolve(record: dict[str, Any], base: _Base, where: str, received_ms: int) -> list[Point]:
    has_value = any(label in record for label in _VALUE_FIELDS)
    has_sum = "s" in record
    if not has_value and not has_sum:
        if "n" in record or "t" in record:
            raise InvalidPayload(f"{where} has a name or time but no value (v, vs, vb, vd or s)")
        return []  # a record of base fields only
    name = base.name + record.get("n", "")
    if not name:
        raise InvalidPayload(f"{where} has no name: set n (or bn in this or an earlier record)")
    if not _NAME.fullmatch(name):
        raise InvalidPayload(
            f"{where}: name {_shown(name)} is not a valid SenML name (letters, digits and "
            "- : . / _ only, starting with a letter or digit)"
        )
    ts = _timestamp(base.time + _number(record.get("t", 0), where, "t"), where, received_ms)
    points: list[Point] = []
    if has_value:
        points.append(Point(_key(name, where), ts, _value(record, base, where)))
    if has_sum:
        total = _finite(base.sum + _number(record["s"], where, "s"), where, "s")
        points.append(Point(_key(name + SUM_SUFFIX, where), ts, total))
    return points


def _value(record: dict[str, Any], base: _Base, where: str) -> Scalar:
    if "v" in record:
        raw = record["v"]
        if base.value == 0:
            return _number(raw, where, "v")  # keeps integers integers
        return _finite(base.value + _number(raw, where, "v"), where, "v")
    if "vb" in record:
        return bool(record["vb"])
    if "vd" in record:
        data: str = record["vd"]
        _check_base64url(data, where)
        return data
    text: str = record["vs"]
    return text


def _check_base64url(data: str, where: str) -> None:
    # RFC 8428 section 4.3: vd is base64url without padding.
    try:
        base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        raise InvalidPayload(f"{where}: vd must be base64url-encoded data") from None
    if "=" in data or not re.fullmatch(r"[A-Za-z0-9_\-]*", data):
        raise InvalidPayload(f"{where}: vd must be base64url-encoded data without padding")


def _number(raw: Any, where: str, label: str) -> float | int:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise InvalidPayload(f"{where}: {label} must be a number")
    if isinstance(raw, int):
        try:
            float(raw)
        except OverflowError:
            raise InvalidPayload(f"{where}: {label} is out of range") from None
    return raw


def _finite(value: float, where: str, label: str) -> float:
    if not math.isfinite(value):
        raise InvalidPayload(f"{where}: {label} is out of range")
    return value


def _timestamp(seconds: float, where: str, received_ms: int) -> int:
    if not math.isfinite(seconds):
        raise InvalidPayload(f"{where}: time is out of range")
    exact = seconds * 1000 + (received_ms if seconds < _RELATIVE_LIMIT else 0)
    if not 0 <= exact <= MAX_TS:  # also false for NaN/inf from an overflowing product
        raise InvalidPayload(
            f"{where}: time {seconds!r} s is outside the range of Unix milliseconds 0 to "
            f"{MAX_TS} (SenML times are seconds: absolute from 2**28 on, relative to now below)"
        )
    return round(exact)


def _key(name: str, where: str) -> str:
    if len(name) > MAX_KEY_LENGTH:
        raise InvalidPayload(
            f"{where}: name {_shown(name)} is {len(name)} characters; "
            f"keys must be 1 to {MAX_KEY_LENGTH} characters"
        )
    return name


def _shown(name: str) -> str:
    return repr(name if len(name) <= 40 else name[:40] + "...")
