"""Live values of the OPC UA telemetry variables, at a cost that does not grow with the points.

Ingestion may commit 100,000 points a second while a variable shows one value. So each
variable keeps only its newest point (one comparison per point) and is read lazily: its
Value attribute is a read callback that turns that point into a DataValue when a client
reads it, so a Read sees the newest committed point at once. Subscriptions need a write
to be notified: every `PUBLISH_INTERVAL_S` the variables that changed *and* are watched
(have a monitored item) are written, one write per variable whatever the number of points
in between. A subscriber therefore sees each variable's latest value within about one
publishing interval; intermediate values of the same interval are coalesced away (the
store keeps every point: HistoryRead returns them).
"""

from __future__ import annotations

import datetime
from typing import Any

from asyncua import ua as _ua

from iiot.adapters.opcua_history import from_ms, variant_of
from iiot.model import Point, Scalar

__all__ = ["PUBLISH_INTERVAL_S", "LiveVariable", "variant_type"]

ua: Any = _ua

# How often watched variables are written (and so notified to subscriptions).
PUBLISH_INTERVAL_S = 0.25


def variant_type(value: Scalar) -> Any:
    """The OPC UA type a stored value is shown as (see `variant_of`)."""
    if isinstance(value, bool):
        return ua.VariantType.Boolean
    if isinstance(value, int | float):
        return ua.VariantType.Double
    return ua.VariantType.String


class LiveVariable:
    """One telemetry variable: its node's Value attribute and the newest point."""

    __slots__ = ("attval", "changed", "nodeid", "point", "reader", "vtype")

    def __init__(self, nodeid: Any, point: Point) -> None:
        self.nodeid = nodeid
        self.point = point
        self.vtype = variant_type(point.value)  # the type the node's DataType says
        self.attval: Any = None  # asyncua's AttributeValue of the node's Value
        self.changed = False  # a newer point than the last one written
        self.reader = self.read  # one bound method, installed as the read callback

    @property
    def watched(self) -> bool:
        """Whether a monitored item follows this variable."""
        return bool(self.attval is not None and self.attval.datachange_callbacks)

    def data_value(self) -> Any:
        """The newest point as a DataValue (SourceTimestamp = the point's ts)."""
        return ua.DataValue(
            Value=variant_of(self.point.value),
            SourceTimestamp=from_ms(self.point.ts),
            ServerTimestamp=datetime.datetime.now(datetime.UTC),
        )

    def read(self, _nodeid: Any, _attr: Any) -> Any:
        """asyncua's read callback of the Value attribute."""
        return self.data_value()

    def attach(self, attval: Any) -> None:
        """Serve the node's Value from this variable (again, after a notifying write)."""
        self.attval = attval
        attval.value = None  # no stored value: asyncua then skips its own type check
        attval.value_callback = self.reader
