"""OPC UA HistoryRead (raw) served from the platform's telemetry store.

asyncua's history protocol: `read_node_history(node, start, end, nb_values)` returns at most
one page of DataValues and, when more exist, the timestamp of the first value left out; the
client's next request carries it as a continuation point and asyncua passes it back as
`start` (inclusive). Point timestamps are unique per key, so paging neither skips nor repeats.

Ranges follow OPC UA Part 11: start < end reads forward over [start, end); start > end reads
backward over (end, start]; an unspecified end reads forward from start; an unspecified start
reads backward from end. Bounding values (`ReturnBounds`) are not returned.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from typing import Any, Literal
from uuid import UUID

from asyncua import ua as _ua
from asyncua.server.history import HistoryStorageInterface

from iiot.errors import NotFound, StorageUnavailable
from iiot.model import Scalar
from iiot.storage.base import Store, TelemetryQuery

__all__ = ["StoreHistory", "from_ms", "to_ms", "variant_of"]

# asyncua's `ua` types are generated NewTypes that mypy cannot follow; treat them as Any.
ua: Any = _ua

log = logging.getLogger(__name__)

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MIN_TS = -(2**62)
_MAX_TS = 2**62


def from_ms(ts: int) -> datetime.datetime:
    """A Unix-ms timestamp as an aware UTC datetime."""
    return _EPOCH + datetime.timedelta(milliseconds=ts)


def to_ms(value: datetime.datetime | None) -> int | None:
    """Unix ms of an OPC UA DateTime; None when unspecified (null or the 1601 epoch)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    if value <= ua.get_win_epoch().replace(tzinfo=datetime.UTC):
        return None
    return (value - _EPOCH) // datetime.timedelta(milliseconds=1)


def variant_of(value: Scalar) -> ua.Variant:
    """The OPC UA value of a stored value: Boolean, Double or String."""
    if isinstance(value, bool):
        return ua.Variant(value, ua.VariantType.Boolean)
    if isinstance(value, int | float):
        return ua.Variant(float(value), ua.VariantType.Double)
    return ua.Variant(str(value), ua.VariantType.String)


class StoreHistory(HistoryStorageInterface):
    """asyncua history storage that reads the platform's store (the pipeline writes it)."""

    def __init__(
        self,
        store: Store,
        locate: Callable[[ua.NodeId], tuple[UUID, str] | None],
        page_size: int = 1000,
    ) -> None:
        super().__init__(max_history_data_response_size=page_size)
        self._store = store
        self._locate = locate

    async def init(self) -> None:
        """Nothing to prepare: the store is already open."""

    async def stop(self) -> None:
        """Nothing to release: the store belongs to the platform."""

    async def new_historized_node(self, node_id: ua.NodeId, period: Any, count: int = 0) -> None:
        """Every telemetry variable is historized by the platform itself."""

    async def save_node_value(self, node_id: ua.NodeId, datavalue: ua.DataValue) -> None:
        """Values are stored by the ingest pipeline, not by asyncua."""

    async def new_historized_event(
        self, source_id: ua.NodeId, evtypes: Any, period: Any, count: int = 0
    ) -> None:
        """Events are not historized."""

    async def save_event(self, event: Any) -> None:
        """Events are not historized."""

    async def read_event_history(
        self, source_id: ua.NodeId, start: Any, end: Any, nb_values: int, evfilter: Any
    ) -> tuple[list[Any], None]:
        """No event history."""
        return [], None

    async def read_node_history(
        self,
        node_id: ua.NodeId,
        start: datetime.datetime | None,
        end: datetime.datetime | None,
        nb_values: int,
    ) -> tuple[list[ua.DataValue], datetime.datetime | None]:
        """One page of stored points of a telemetry variable and the continuation time."""
        target = self._locate(node_id)
        if target is None:
            return [], None
        device_id, key = target
        page = self.max_history_data_response_size
        if nb_values and nb_values > 0:
            page = min(page, nb_values)
        query = _range_query(to_ms(start), to_ms(end), key, page + 1)
        try:
            found = await self._store.query_telemetry(None, device_id, query)
        except NotFound:
            return [], None
        except StorageUnavailable:
            log.warning("OPC UA HistoryRead of %s: the database is unavailable", node_id)
            raise ua.UaStatusCodeError(ua.StatusCodes.BadResourceUnavailable) from None
        points = found.get(key, [])
        cont = from_ms(points[page][0]) if len(points) > page else None
        values = [
            ua.DataValue(Value=variant_of(value), SourceTimestamp=from_ms(ts))
            for ts, value in points[:page]
        ]
        return values, cont


def _range_query(start: int | None, end: int | None, key: str, limit: int) -> TelemetryQuery:
    order: Literal["asc", "desc"]
    if start is None and end is None:
        low, high, order = _MIN_TS, _MAX_TS, "asc"
    elif end is None:
        assert start is not None
        low, high, order = start, _MAX_TS, "asc"
    elif start is None:
        low, high, order = _MIN_TS, end + 1, "desc"
    elif start <= end:
        low, high, order = start, max(end, start + 1), "asc"
    else:
        low, high, order = end + 1, start + 1, "desc"
    return TelemetryQuery(start=low, end=high, keys=(key,), limit=limit, order=order)
