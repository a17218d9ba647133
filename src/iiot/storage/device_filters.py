"""The WHERE clause of a device list, shared by both stores (only placeholders differ)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from iiot.storage.base import DeviceFilter, Scope

__all__ = ["device_where", "like_pattern"]


def like_pattern(text: str) -> str:
    """A LIKE pattern matching names that contain `text` (wildcards in it taken literally)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def device_where(
    scope: Scope,
    filters: DeviceFilter | None,
    param: Callable[[Any], str],
    *,
    uuid: Callable[[Any], Any],
    like: str,
) -> str:
    """`WHERE ...` (or "") for a scope and a filter.

    `param(value)` records a parameter and returns its placeholder; `uuid` turns a UUID into
    the driver's form; `like` is the dialect's case-insensitive LIKE operator.
    """
    clauses: list[str] = []
    if scope is not None:
        clauses.append(f"tenant_id = {param(uuid(scope))}")
    if filters is not None:
        if filters.search:
            clauses.append(f"name {like} {param(like_pattern(filters.search))} ESCAPE '\\'")
        if filters.type is not None:
            clauses.append(f"type = {param(filters.type)}")
        if filters.status is not None:
            clauses.append(f"status = {param(filters.status)}")
        if filters.connected is not None:
            clauses.append(f"connected = {param(filters.connected)}")
        if filters.seen_since is not None:
            clauses.append(f"last_seen >= {param(filters.seen_since)}")
        if filters.not_seen_since is not None:
            clauses.append(f"(last_seen IS NULL OR last_seen < {param(filters.not_seen_since)})")
        if filters.gateway_id is not None:
            clauses.append(f"gateway_id = {param(uuid(filters.gateway_id))}")
    return ("WHERE " + " AND ".join(clauses)) if clauses else ""
