"""Telemetry queries: raw ranges, aggregates per interval (computed in SQL) and latest values."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Literal
from uuid import UUID

import orjson
from fastapi import APIRouter, Query, Response

from iiot.api.deps import Auth, Svc
from iiot.api.schemas import MANAGEMENT_ERRORS, TsValue
from iiot.codec import MAX_KEY_LENGTH, MAX_TS
from iiot.errors import InvalidRequest
from iiot.storage.base import TelemetryQuery

__all__ = ["parse_interval", "parse_keys", "parse_time", "router"]

router = APIRouter(prefix="/api/devices", tags=["telemetry"], responses=MANAGEMENT_ERRORS)

MAX_LIMIT = 10_000
MAX_BUCKETS = 10_000
MAX_KEYS = 100
# Points one response may carry: keys x limit (x buckets for aggregates), docs/api.md.
MAX_RESPONSE_POINTS = 100_000
# URLs beyond ~8 KB are refused by many proxies (and by the HTTP server itself at 16 KB).
MAX_KEYS_TEXT = 8000
_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_INTERVAL = re.compile(r"^\s*(\d{1,15})\s*(ms|s|m|h|d|w)?\s*$")
_DIGITS = re.compile(r"^-?\d{1,20}$")

Agg = Literal["none", "avg", "min", "max", "sum", "count"]
TimeParam = Annotated[
    str | None,
    Query(
        max_length=64,
        description="Unix milliseconds or ISO 8601 (e.g. 2026-01-01T00:00:00Z)",
    ),
]


def parse_time(raw: str, name: str) -> int:
    """Unix ms from digits or an ISO 8601 date/time (UTC when no offset is given)."""
    text = raw.strip()
    if _DIGITS.match(text):
        value = int(text)
    else:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidRequest(
                f"{name}={raw!r} is not Unix milliseconds or an ISO 8601 date/time"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        value = int(moment.timestamp() * 1000)
    if not 0 <= value <= MAX_TS + 1:
        raise InvalidRequest(f"{name}={raw!r} is out of range: from 1970 to year 9999")
    return value


def parse_interval(raw: str) -> int:
    """A bucket width in ms from e.g. `500ms`, `30s`, `1m`, `1h`, `1d`, `1w` or plain ms."""
    match = _INTERVAL.match(raw)
    if match is None:
        raise InvalidRequest(
            f"interval={raw!r} is not valid: expected a number with a unit ms, s, m, h, d or w "
            "(e.g. 1m, 1h)"
        )
    value = int(match.group(1)) * _UNITS_MS[match.group(2) or "ms"]
    if not 1 <= value <= MAX_TS:
        raise InvalidRequest(f"interval={raw!r} must be from 1 ms to about 8000 years")
    return value


def parse_keys(raw: str | None) -> tuple[str, ...] | None:
    """Comma-separated keys, or None (every key) when absent or empty."""
    if raw is None:
        return None
    keys = tuple(dict.fromkeys(k for k in raw.split(",") if k))
    if not keys:
        return None
    if len(keys) > MAX_KEYS:
        raise InvalidRequest(f"at most {MAX_KEYS} keys per query (got {len(keys)})")
    for key in keys:
        if len(key) > MAX_KEY_LENGTH:
            raise InvalidRequest(f"key {key[:40]!r}... is over {MAX_KEY_LENGTH} characters")
        # Keys may hold any text a device sent, but never NUL or lone surrogates (no store
        # can hold them, so no point can have such a key).
        if "\x00" in key or not _encodable(key):
            raise InvalidRequest(f"key {key[:40]!r} is not valid text")
    return keys


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json(document: object) -> Response:
    # Serialised straight to bytes by orjson: a 24-hour history is thousands of points, and
    # neither pydantic validation nor the json module is needed for these plain values.
    # The documented shape stays the route's `response_model`.
    return Response(orjson.dumps(document), media_type="application/json")


@router.get(
    "/{device_id}/telemetry",
    response_model=dict[str, list[TsValue]],
    summary="Query telemetry (raw or aggregated)",
)
async def query_telemetry(
    device_id: UUID,
    principal: Auth,
    services: Svc,
    keys: Annotated[
        str | None, Query(max_length=MAX_KEYS_TEXT, description="a,b,c (default: every key)")
    ] = None,
    start: TimeParam = None,
    end: TimeParam = None,
    limit: Annotated[
        int | None, Query(ge=1, le=MAX_LIMIT, description="points or buckets per key")
    ] = None,
    agg: Annotated[Agg, Query(description="aggregate per interval, or none")] = "none",
    interval: Annotated[
        str | None, Query(max_length=32, description="bucket width: 500ms, 30s, 1m, 1h, 1d, 1w")
    ] = None,
    order: Annotated[Literal["asc", "desc"], Query(description="by timestamp")] = "asc",
) -> Response:
    """Points in [start, end) per key; with `agg`, one value per `interval` bucket."""
    key_list = parse_keys(keys)
    start_ms = 0 if start is None else parse_time(start, "start")
    end_ms = MAX_TS + 1 if end is None else parse_time(end, "end")
    if end_ms <= start_ms:
        raise InvalidRequest(f"end ({end_ms}) must be after start ({start_ms})")
    interval_ms = 0
    if agg != "none":
        if interval is None:
            raise InvalidRequest(f"agg={agg} needs an interval such as 1m or 1h")
        if start is None or end is None:
            raise InvalidRequest(f"agg={agg} needs both start and end")
        interval_ms = parse_interval(interval)
        first = start_ms - start_ms % interval_ms
        buckets = (end_ms - 1 - first) // interval_ms + 1
        if buckets > MAX_BUCKETS:
            raise InvalidRequest(
                f"the range holds {buckets} intervals of {interval}; the limit is "
                f"{MAX_BUCKETS} per query: narrow start/end or widen the interval"
            )
        effective_limit = limit if limit is not None else MAX_BUCKETS
    else:
        if interval is not None:
            raise InvalidRequest("interval is only used with agg (avg, min, max, sum, count)")
        effective_limit = limit if limit is not None else 1000
    query = TelemetryQuery(
        start=start_ms,
        end=end_ms,
        keys=key_list,
        limit=effective_limit,
        order=order,
        agg=agg,
        interval_ms=interval_ms,
        max_points=MAX_RESPONSE_POINTS,
    )
    result = await services.store.query_telemetry(principal.scope, device_id, query)
    return _json(
        {key: [{"ts": ts, "value": value} for ts, value in rows] for key, rows in result.items()}
    )


@router.get(
    "/{device_id}/telemetry/latest",
    response_model=dict[str, TsValue],
    summary="Latest value of each key",
)
async def latest(
    device_id: UUID,
    principal: Auth,
    services: Svc,
    keys: Annotated[
        str | None, Query(max_length=MAX_KEYS_TEXT, description="a,b,c (default: every key)")
    ] = None,
) -> Response:
    """The newest point of each key (or of the keys asked for)."""
    points = await services.store.latest(principal.scope, device_id, parse_keys(keys))
    return _json({key: {"ts": p.ts, "value": p.value} for key, p in points.items()})
