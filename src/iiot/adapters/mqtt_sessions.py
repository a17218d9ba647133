"""Persistent MQTT sessions: the subscriptions of a client id kept while it is away.

A device connecting with a persistent session (3.1.1 clean session 0; v5 clean start 0 and a
session expiry) finds its subscriptions again, and with them its command and attribute links.
"""

from __future__ import annotations

from uuid import UUID

from iiot.model import Device
from iiot.services import Services

__all__ = ["SessionStore"]

_MAX_SESSIONS = 100_000


class SessionStore:
    """Subscriptions by client id, for the device that owns the session."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._saved: dict[str, tuple[UUID, dict[str, int]]] = {}

    async def load(self, client_id: str, device: Device) -> dict[str, int] | None:
        """The saved subscriptions of this client id if the device owns them."""
        entry = self._saved.get(client_id)
        if entry is None or entry[0] != device.id:
            return None
        return dict(entry[1])

    async def save(self, client_id: str, device: Device, subscriptions: dict[str, int]) -> None:
        """Remember the subscriptions of a persistent session."""
        if len(self._saved) >= _MAX_SESSIONS and client_id not in self._saved:
            del self._saved[next(iter(self._saved))]
        self._saved[client_id] = (device.id, dict(subscriptions))

    async def drop(self, client_id: str) -> None:
        """A clean session replaces whatever was saved."""
        self._saved.pop(client_id, None)
