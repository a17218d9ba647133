"""Device presence: `last_seen` and `connected`, written in batches, never once per message.

Adapters note a device's messages (`Presence.seen`, a dict write) and its links come and go
through `DeviceLinks`. Once a second the tracker writes what changed in one statement per
column, and publishes a `RecordEvent("connectivity", ...)` for each device that connected
or disconnected, so the console, alarms and OPC UA see it live.

`connected` is what this process saw: a process that is killed leaves its devices marked
connected until they reconnect elsewhere or come back (documented in docs/operations.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Self
from uuid import UUID

from iiot.bus import RecordEvent
from iiot.errors import StorageUnavailable
from iiot.links import DeviceLink
from iiot.model import Device
from iiot.services import Services
from iiot.supervisor import cancel_and_wait

__all__ = ["PresenceTracker"]

log = logging.getLogger(__name__)

_FLUSH_INTERVAL_S = 1.0


class PresenceTracker:
    """Writes presence in batches and tells the live bus when connectivity changes."""

    name = "presence"

    def __init__(self, services: Services) -> None:
        self._services = services
        self._connected: dict[UUID, bool] = {}  # changes not yet written
        self._devices: dict[UUID, Device] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._services.links.add_listener(self._on_link)
        self._task = asyncio.create_task(self._run(), name="presence")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._services.links.remove_listener(self._on_link)
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        # Links still open are closing with the platform: their devices disconnect.
        for device in self._services.links.devices():
            self._connected[device.id] = False
            self._devices[device.id] = device
        with contextlib.suppress(StorageUnavailable):
            await self.flush()

    def describe(self) -> str:
        """One line for the start-up log."""
        return f"device presence written every {_FLUSH_INTERVAL_S:g} s"

    def _on_link(self, device: Device, _link: DeviceLink, attached: bool) -> None:
        links = self._services.links
        now_connected = links.connected(device.id)
        if attached or not now_connected:
            self._connected[device.id] = now_connected
            self._devices[device.id] = device
        self._services.presence.seen(device.id)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(_FLUSH_INTERVAL_S)
            try:
                await self.flush()
            except StorageUnavailable as exc:
                log.warning("device presence not written, retrying: %s", exc)
            except Exception:  # presence is a view: never let it stop the platform
                log.exception("device presence not written")

    async def flush(self) -> None:
        """Write what changed since the last flush; on failure keep it for the next one."""
        seen = self._services.presence.take()
        changes, self._connected = self._connected, {}
        try:
            await self._services.store.record_presence(seen, changes)
        except BaseException:
            for device_id, ts in seen.items():  # give it back, newer values winning
                self._services.presence.last_seen.setdefault(device_id, ts)
            for device_id, state in changes.items():
                self._connected.setdefault(device_id, state)
            raise
        for device_id, state in changes.items():
            device = self._devices.pop(device_id, None)
            if device is None:
                continue
            self._services.bus.publish(
                RecordEvent(
                    "connectivity",
                    "connected" if state else "disconnected",
                    device.tenant_id,
                    device.id,
                    {
                        "device_id": str(device.id),
                        "connected": state,
                        "last_seen": seen.get(device_id, device.last_seen),
                    },
                )
            )
