"""Messages seen per device: what adapters report, cheap enough for every message.

`PresenceTracker` (presence_tracker.py) writes it in batches with the devices' connectivity.
"""

from __future__ import annotations

import time
from uuid import UUID

__all__ = ["Presence"]


class Presence:
    """What adapters report: messages seen. Cheap enough for every message."""

    def __init__(self) -> None:
        self.last_seen: dict[UUID, int] = {}

    def seen(self, device_id: UUID, now_ms: int | None = None) -> None:
        """The device sent something (telemetry, a reply, a ping, a poll)."""
        self.last_seen[device_id] = int(time.time() * 1000) if now_ms is None else now_ms

    def take(self) -> dict[UUID, int]:
        """What was seen since the last call."""
        taken, self.last_seen = self.last_seen, {}
        return taken
