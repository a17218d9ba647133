"""The command service's clock: timeouts, expiry and re-queueing, and a rescue of QUEUED
commands whose event was lost (a mixin of `CommandService`).

Every half second the store is asked for the commands whose deadline or expiry has come:
EXPIRED at `expires_at`; an unanswered or unconfirmed attempt becomes TIMEOUT and, with a
retry left (or persistent and never confirmed), QUEUED again.
"""

from __future__ import annotations

import asyncio
import logging
from uuid import UUID

from iiot.control.rules import EXPIRABLE
from iiot.links import DeviceLinks
from iiot.storage._common import now_ms
from iiot.storage.base import Store
from iiot.storage.control import Command

__all__ = ["CommandSweeps"]

log = logging.getLogger("iiot.control.commands")

_SWEEP_S = 0.5
# Every this many sweeps, QUEUED commands of devices with a link here are delivered even if
# their event was lost (a bus queue that overflowed, a bridge that reconnected).
_RESCUE_EVERY = 10
_RESCUE_AGE_MS = 2000  # after a link failed: wait before trying the device's links again


class CommandSweeps:
    """Timeouts, expiry and the rescue round; the state changes are the service's own."""

    _store: Store
    _links: DeviceLinks

    async def _move(
        self,
        command: Command,
        to: str,
        allowed_from: tuple[str, ...],
        *,
        deadline: int | None = None,
        error: str | None = None,
        add_attempts: int = 0,
    ) -> Command | None:
        raise NotImplementedError

    def _schedule_flush(self, device_id: UUID) -> None:
        raise NotImplementedError

    async def _sweep_forever(self) -> None:
        rounds = 0
        while True:
            rounds += 1
            try:
                await self.sweep()
                if rounds % _RESCUE_EVERY == 0:
                    await self._rescue_queued()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # storage down: try again on the next round
                log.warning("command sweep failed: %s", exc)
            await asyncio.sleep(_SWEEP_S)

    async def sweep(self) -> None:
        """Expire, time out and re-queue the commands whose time has come."""
        now = now_ms()
        for command in await self._store.control.due_commands(None, now, 1000):
            if command.final:
                continue
            if command.expires_at <= now:
                await self._move(command, "EXPIRED", EXPIRABLE, error="expired before an answer")
            elif command.status == "TIMEOUT":
                await self._move(command, "QUEUED", ("TIMEOUT",))
            elif command.status in ("SENT", "DELIVERED"):
                await self._time_out(command)

    async def _rescue_queued(self) -> None:
        before = now_ms() - _RESCUE_AGE_MS
        for device_id in await self._store.control.queued_devices(None, before, 10_000):
            if self._links.connected(device_id):
                self._schedule_flush(device_id)

    async def _time_out(self, command: Command) -> None:
        # A persistent command the device never confirmed did not reach it: queue it again
        # until it expires, retries or not (a restart must not leave it TIMEOUT for ever).
        again = (command.persistent and command.status == "SENT") or (
            command.attempts <= command.retries
        )
        timed_out = await self._move(
            command,
            "TIMEOUT",
            (command.status,),
            deadline=now_ms() if again else None,
            error="no delivery confirmation" if command.status == "SENT" else "no answer",
        )
        if timed_out is not None and again:
            await self._move(timed_out, "QUEUED", ("TIMEOUT",))
