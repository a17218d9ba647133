"""Senders waiting for their commands (the REST call, OPC UA `SendCommand`).

A state change made in this process wakes its waiters with the command itself, so they
need no read to learn it; a change seen only as a bus event (made by another process) wakes
them too, and they read the stored command once the event says it is settled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any
from uuid import UUID

from iiot.control.rules import settled, settled_data
from iiot.storage.control import Command

__all__ = ["Waiter", "Waiters"]


class Waiter:
    """One sender waiting for one command."""

    __slots__ = ("event", "latest", "settled_elsewhere")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.latest: Command | None = None  # the newest state made in this process
        self.settled_elsewhere = False  # a bus event said it is settled: read it

    def known(self) -> Command | None:
        """The command as changed here, unless a newer state must be read."""
        latest = self.latest
        if latest is None or (self.settled_elsewhere and not settled(latest)):
            return None
        return latest


class Waiters:
    """Waiting senders by command id."""

    def __init__(self) -> None:
        self._by_command: dict[UUID, set[Waiter]] = {}

    @contextlib.contextmanager
    def waiting(self, command_id: UUID) -> Iterator[Waiter]:
        """A waiter for the command, registered while the block runs."""
        waiter = Waiter()
        self._by_command.setdefault(command_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            waiters = self._by_command.get(command_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._by_command[command_id]

    def changed_here(self, command: Command) -> None:
        """A state change made in this process."""
        for waiter in self._by_command.get(command.id, ()):
            waiter.latest = command
            waiter.event.set()

    def heard(self, command_id: UUID, data: Any) -> None:
        """A command event from the bus (its REST representation)."""
        for waiter in self._by_command.get(command_id, ()):
            latest = waiter.latest
            if latest is None or latest.status != data.get("status"):
                waiter.settled_elsewhere = waiter.settled_elsewhere or settled_data(data)
            waiter.event.set()
