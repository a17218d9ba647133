"""Stopping a component's background task."""

from __future__ import annotations

import asyncio
import sys

import pytest

from iiot.supervisor import cancel_and_wait


async def test_a_task_that_swallowed_its_cancellation_is_still_stopped() -> None:
    # Python 3.11's asyncio.wait_for returns instead of raising when the cancellation lands
    # just as its inner wait completes, and the loop around it runs on: a platform stopping in
    # a benchmark waited for its alarm engine for ever.
    swallowed = asyncio.Event()

    async def loop() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()
        await asyncio.Event().wait()  # runs on, as the loop around wait_for did

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    async with asyncio.timeout(10):
        await cancel_and_wait(task, patience_s=0.1)
    assert swallowed.is_set()
    assert task.cancelled()


async def test_a_stopped_task_keeps_its_own_error() -> None:
    async def fails() -> None:
        raise RuntimeError("broken")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="broken"):
        await cancel_and_wait(task)


async def _cancel_as_the_wait_completes(wait: str) -> asyncio.Task[None]:
    event = asyncio.Event()

    async def waits() -> None:
        if wait == "wait_for":
            await asyncio.wait_for(event.wait(), 3600)
        else:
            async with asyncio.timeout(3600):
                await event.wait()
        await asyncio.sleep(3600)  # a loop going on

    task = asyncio.create_task(waits())
    await asyncio.sleep(0)
    event.set()  # the inner wait completes ...
    task.cancel()  # ... in the same loop turn as the cancellation
    await asyncio.wait({task}, timeout=2)
    return task


async def test_asyncio_timeout_never_swallows_a_cancellation_as_wait_for_does_here() -> None:
    """Why the platform's loops wait with asyncio.timeout, not asyncio.wait_for."""
    assert (await _cancel_as_the_wait_completes("timeout")).cancelled()
    swallowed = await _cancel_as_the_wait_completes("wait_for")
    assert swallowed.cancelled() == (sys.version_info >= (3, 12))
    await cancel_and_wait(swallowed, patience_s=0.1)
