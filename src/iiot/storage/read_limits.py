"""Bounds on what one telemetry read may return, checked before the database reads it."""

from __future__ import annotations

from iiot.errors import InvalidRequest
from iiot.storage.base import TelemetryQuery

__all__ = ["check_response_size"]


def check_response_size(query: TelemetryQuery, key_count: int) -> None:
    """Refuse a query that could answer more than `query.max_points` points, saying how to page."""
    if query.max_points is None:
        return
    per_key = query.limit
    if query.agg != "none" and query.interval_ms > 0:
        # An aggregate answers at most one value per bucket in the range.
        first = query.start - query.start % query.interval_ms
        per_key = min(per_key, max(0, (query.end - 1 - first) // query.interval_ms + 1))
    total = key_count * per_key
    if total > query.max_points:
        raise InvalidRequest(
            f"this query could return {total} points ({key_count} keys x {per_key}); one"
            f" response carries at most {query.max_points} points: ask for fewer keys or a"
            " smaller limit, and page through time with start/end (the next page starts"
            " just after the last ts received)"
        )
