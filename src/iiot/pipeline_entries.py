"""What the ingest pipeline queues: entries, batches in flight, completion callbacks.

Also the part of the store it writes to (`PointWriter`) and the callback type `Done`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from iiot.model import DevicePoints

__all__ = ["Done", "PointWriter"]

log = logging.getLogger("iiot.pipeline")  # the pipeline's logger, as before the split


class PointWriter(Protocol):
    """The part of the store the pipeline needs."""

    async def write_points(self, batch: Sequence[DevicePoints]) -> None:
        """Commit a batch in one transaction."""
        ...


# Told once whether a message's points were committed: None, or why not.
Done = Callable[[BaseException | None], None]


class _Waiter(Protocol):
    """What the pipeline needs of an asyncio future (or of a `_Callback` in its place)."""

    def done(self) -> bool: ...
    def set_result(self, result: None, /) -> None: ...
    def set_exception(self, exception: type | BaseException, /) -> None: ...


class _Callback:
    """A sender's callback in place of a future: called right where the batch is finished.

    A future would schedule its own callbacks through the event loop, one more step per
    message; at tens of thousands of messages a second that was a third of the pipeline's
    CPU (docs/performance.md).
    """

    __slots__ = ("_done", "_fn")

    def __init__(self, fn: Done) -> None:
        self._fn = fn
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, result: None, /) -> None:
        self._tell(None)

    def set_exception(self, exception: type | BaseException, /) -> None:
        self._tell(exception if isinstance(exception, BaseException) else exception())

    def _tell(self, error: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._fn(error)
        except Exception:  # a sender's bug must not stop the writer telling the others
            log.exception("ingest completion callback failed")


@dataclass(slots=True, eq=False)
class _Entry:
    item: DevicePoints
    protocol: str
    future: _Waiter
    enqueued: float
    deadline: float
    taken: bool = field(default=False)


@dataclass(slots=True, eq=False)
class _InFlight:
    batch: list[_Entry]
    items: list[DevicePoints]  # what is written: the entries' points, in order
    points: int
    deadline: float  # the earliest deadline of a sender still waiting on this batch
    done: bool = False  # written (or refused for good); its senders not yet told
    error: BaseException | None = None
    # Set when the batch was split to find bad messages: one outcome per item.
    errors: list[BaseException | None] | None = None
