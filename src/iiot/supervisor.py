"""Reconnection and retry helpers shared by every component (one place, not one per adapter)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Backoff", "cancel_and_wait", "supervise"]


@dataclass(slots=True)
class Backoff:
    """Bounded exponential backoff with jitter."""

    initial_s: float = 0.1
    max_s: float = 5.0
    factor: float = 2.0
    _current: float = 0.0

    def next_delay(self) -> float:
        """The next wait: doubles up to the bound, with ±20 % jitter."""
        self._current = (
            self.initial_s if self._current == 0 else min(self._current * self.factor, self.max_s)
        )
        return self._current * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        """Start again from the shortest wait (after a success)."""
        self._current = 0.0


async def supervise(
    name: str,
    run: Callable[[Callable[[], None]], Awaitable[None]],
    logger: logging.Logger,
    on_state: Callable[[bool, str], None] | None = None,
    backoff: Backoff | None = None,
) -> None:
    """Run `run(connected)` forever, reconnecting with backoff when it fails.

    `run` connects, calls `connected()` once it is up, then serves until the connection
    is lost (it returns or raises). Being down is logged once and recovery once, not on
    every attempt. Cancellation stops the loop.
    """
    delay = backoff or Backoff()
    down = False

    def connected() -> None:
        nonlocal down
        delay.reset()
        if on_state is not None:
            on_state(True, "connected")
        if down:
            logger.warning("%s recovered", name)
            down = False

    while True:
        try:
            await run(connected)
            reason = "connection closed"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the supervisor's whole job is to outlive any failure
            reason = f"{type(exc).__name__}: {exc}"
        if on_state is not None:
            on_state(False, reason)
        if not down:
            logger.error("%s down (%s); reconnecting with backoff", name, reason)
            down = True
        await asyncio.sleep(delay.next_delay())


async def cancel_and_wait(task: asyncio.Task[Any] | None, patience_s: float = 15.0) -> None:
    """Cancel a component's background task and wait until it has stopped.

    Python 3.11's `asyncio.wait_for` swallows a cancellation that lands just as the awaited
    thing completes (fixed in 3.12), and the task then runs on: a stopping platform waited
    for its alarm engine for ever (seen in a benchmark). Loops use `asyncio.timeout`
    instead; as a safety net, a task still running `patience_s` after its cancellation is
    cancelled again (longer than any cleanup here takes: closes are bounded at 10 s).
    """
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=patience_s)
    with contextlib.suppress(asyncio.CancelledError):
        await task
