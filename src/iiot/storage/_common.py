"""Helpers shared by the SQLite and PostgreSQL stores: value columns, batches, migrations."""

from __future__ import annotations

import math
import time
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from uuid import UUID

from iiot.errors import InvalidRequest
from iiot.model import AGGREGATES, DevicePoints, Role, Scalar
from iiot.storage.base import TelemetryQuery

__all__ = [
    "BatchRows",
    "Migration",
    "Row",
    "ValueColumns",
    "batch_rows",
    "check_page",
    "check_query",
    "check_user_tenant",
    "dedup_rows",
    "group_rows",
    "load_migrations",
    "now_ms",
    "value_columns",
    "value_from_columns",
]

# (num_value, int_value, bool_value, str_value): exactly one is not None.
ValueColumns = tuple[float | None, int | None, bool | None, str | None]
# (device_id, key, ts, num_value, int_value, bool_value, str_value), the telemetry row shape.
Row = tuple[UUID, str, int, float | None, int | None, bool | None, str | None]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def now_ms() -> int:
    """The current time in Unix milliseconds."""
    return time.time_ns() // 1_000_000


def value_columns(value: Scalar) -> ValueColumns:
    """Split a typed value into the four value columns."""
    # bool first: bool is a subclass of int in Python.
    if isinstance(value, bool):
        return None, None, value, None
    if isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            return None, value, None, None
        # Beyond 64 bits no column keeps it exactly; a float keeps its magnitude.
        return float(value), None, None, None
    if isinstance(value, float):
        if math.isfinite(value):
            return value, None, None, None
        # SQLite turns NaN into NULL and JSON has no NaN/Infinity: keep their JSON text
        # rather than failing the whole batch.
        text = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return None, None, None, text
    if isinstance(value, str):
        return None, None, None, value
    raise InvalidRequest(f"unsupported telemetry value type {type(value).__name__}")


def value_from_columns(
    num: float | None, integer: int | None, boolean: bool | int | None, text: str | None
) -> Scalar:
    """Rebuild the typed value from the four value columns."""
    if num is not None:
        return float(num)
    if integer is not None:
        return int(integer)
    if boolean is not None:
        return bool(boolean)  # SQLite stores booleans as 0/1
    if text is not None:
        return text
    raise ValueError("telemetry row without a value")


@dataclass(frozen=True, slots=True)
class BatchRows:
    """A batch as telemetry rows, with what every store needs to write it."""

    rows: list[Row]  # in batch order; may repeat a (device, key, ts)
    device_ids: list[UUID]  # distinct, sorted: every writer locks devices in one order
    newest: list[Row]  # per (device, key) the row with the largest ts (the later on ties)

    def with_every_series(self) -> BatchRows:
        """The same batch with `newest` for every series (after a partial `batch_rows`)."""
        newest: dict[tuple[UUID, str], Row] = {}
        for row in self.rows:
            seen = newest.get((row[0], row[1]))
            if seen is None or row[2] >= seen[2]:
                newest[(row[0], row[1])] = row
        return BatchRows(self.rows, self.device_ids, list(newest.values()))

    def without(self, alive: set[UUID]) -> BatchRows:
        """The same batch restricted to the devices in `alive`."""
        return BatchRows(
            [r for r in self.rows if r[0] in alive],
            [d for d in self.device_ids if d in alive],
            [r for r in self.newest if r[0] in alive],
        )


_NO_KEYS: frozenset[str] = frozenset()


def batch_rows(
    batch: Sequence[DevicePoints], known: Mapping[UUID, Container[str]] | None = None
) -> BatchRows:
    """Telemetry rows of a batch, its devices and its newest point per key, in one pass.

    With `known` (device -> keys), `newest` holds only the series not in it: a store that
    keeps latest values another way only needs to register new series.

    This loop runs for every point ingested, so it is written for speed: the value types
    inline, and newest points looked up by key within each device.
    """
    rows: list[Row] = []
    append = rows.append
    isfinite = math.isfinite
    newest_by_device: dict[UUID, dict[str, Row]] = {}
    for item in batch:
        if not item.points:
            continue
        device_id = item.device.id
        newest = newest_by_device.get(device_id)
        if newest is None:
            newest = newest_by_device[device_id] = {}
        seen_row = newest.get
        skip = _NO_KEYS if known is None else known.get(device_id, _NO_KEYS)
        for point in item.points:
            value, key, ts = point.value, point.key, point.ts
            row: Row
            if type(value) is float and isfinite(value):
                row = (device_id, key, ts, value, None, None, None)
            elif type(value) is int and _INT64_MIN <= value <= _INT64_MAX:
                row = (device_id, key, ts, None, value, None, None)
            elif type(value) is bool:
                row = (device_id, key, ts, None, None, value, None)
            elif type(value) is str:
                row = (device_id, key, ts, None, None, None, value)
            else:
                row = (device_id, key, ts, *value_columns(value))
            append(row)
            if key in skip:
                continue
            seen = seen_row(key)
            if seen is None or ts >= seen[2]:
                newest[key] = row
    return BatchRows(
        rows,
        sorted(newest_by_device),
        [row for per_key in newest_by_device.values() for row in per_key.values()],
    )


def dedup_rows(rows: Iterable[Row]) -> list[Row]:
    """Rows with one per (device, key, ts): the last one wins, as if written in order.

    A single INSERT ... ON CONFLICT cannot touch the same row twice.
    """
    return list({(r[0], r[1], r[2]): r for r in rows}.values())


def check_page(limit: int, offset: int) -> None:
    """Refuse a negative page size or offset."""
    if limit < 0 or offset < 0:
        raise InvalidRequest(f"limit and offset must not be negative (got {limit}, {offset})")


def check_query(query: TelemetryQuery) -> None:
    """Refuse a telemetry query that cannot be answered."""
    if query.limit < 0:
        raise InvalidRequest(f"limit must not be negative (got {query.limit})")
    if query.order not in ("asc", "desc"):
        raise InvalidRequest(f"order must be 'asc' or 'desc' (got {query.order!r})")
    if query.agg != "none":
        if query.agg not in AGGREGATES:
            raise InvalidRequest(f"agg must be one of none, {', '.join(AGGREGATES)}")
        if query.interval_ms <= 0:
            raise InvalidRequest(f"an aggregate needs an interval > 0 ms (got {query.interval_ms})")


def check_user_tenant(role: Role, tenant_id: UUID | None) -> None:
    """Sysadmins have no tenant; every other role belongs to exactly one."""
    if role is Role.SYSADMIN and tenant_id is not None:
        raise InvalidRequest("a sysadmin belongs to no tenant")
    if role is not Role.SYSADMIN and tenant_id is None:
        raise InvalidRequest(f"a {role.value} must belong to a tenant")


@dataclass(frozen=True, slots=True)
class Migration:
    """One versioned schema change of one SQL dialect."""

    version: int
    name: str
    sql: str


def load_migrations(dialect: str) -> list[Migration]:
    """The dialect's migrations (package data `migrations/<dialect>/NNNN_name.sql`), in order."""
    folder = resources.files("iiot.storage").joinpath("migrations", dialect)
    found: list[Migration] = []
    for entry in folder.iterdir():
        name = entry.name
        if not name.endswith(".sql"):
            continue
        number, _, _ = name.partition("_")
        found.append(Migration(int(number), name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two {dialect} migrations share a version: {versions}")
    return found


def group_rows(
    rows: Iterable[tuple[str, int, Scalar]],
) -> dict[str, list[tuple[int, Scalar]]]:
    """(key, ts, value) rows, already ordered, as lists per key."""
    result: dict[str, list[tuple[int, Scalar]]] = {}
    for key, ts, value in rows:
        result.setdefault(key, []).append((ts, value))
    return result
