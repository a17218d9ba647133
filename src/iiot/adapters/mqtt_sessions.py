"""Persistent MQTT sessions: the subscriptions of a client id kept while it is away.

A device connecting with a persistent session (3.1.1 clean session 0; v5 clean start 0 and a
session expiry) finds its subscriptions again, and with them its command and attribute
links. They are kept in the database, so a restarted platform (or another platform process
behind the same port) knows them too.

Every clean-session connect forgets what its client id saved before. Those deletes are
gathered: the connects of one moment (thousands when a fleet reconnects after an outage or
a restart) cost one statement, not one each, which would hold the store's connections for
seconds while API requests and commands wait behind them. A client id whose delete is
still to come reads no session, and its own reads and writes wait until that delete is
done, so they stay in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any
from uuid import UUID

from iiot.errors import StorageUnavailable
from iiot.model import Device
from iiot.services import Services

__all__ = ["SessionStore"]

log = logging.getLogger("iiot.adapters.mqtt_server")

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Future[None]"]


class SessionStore:
    """Subscriptions by client id, for the device that owns the session."""

    def __init__(self, services: Services, spawn: Spawn | None = None) -> None:
        """`spawn` runs the background deletes (default: `asyncio.ensure_future`), so the
        endpoint can cancel them when it stops."""
        self.store = services.store
        self._spawn: Spawn = spawn or asyncio.ensure_future
        self._to_drop: dict[str, UUID] = {}  # client id -> tenant, for the next delete
        self._dropping: set[str] = set()  # in the delete being written now
        self._dropper: asyncio.Future[None] | None = None

    async def load(self, client_id: str, device: Device) -> dict[str, int] | None:
        """The saved subscriptions of this client id if the device owns them."""
        await self._settle(client_id)
        try:
            saved = await self.store.get_mqtt_session(device.tenant_id, client_id)
        except StorageUnavailable as exc:
            log.warning("MQTT session %r not restored: %s", client_id, exc)
            return None
        if saved is None or saved[0] != device.id:
            return None
        return saved[1]

    async def save(self, client_id: str, device: Device, subscriptions: dict[str, int]) -> None:
        """Remember the subscriptions of a persistent session."""
        await self._settle(client_id)
        try:
            await self.store.save_mqtt_session(
                device.tenant_id, client_id, device.id, dict(subscriptions)
            )
        except StorageUnavailable as exc:
            log.warning("MQTT session %r not saved: %s", client_id, exc)

    async def drop(self, client_id: str, device: Device) -> None:
        """A clean session replaces whatever was saved: forget it now."""
        await self._settle(client_id)
        try:
            await self.store.delete_mqtt_session(device.tenant_id, client_id)
        except StorageUnavailable as exc:
            log.warning("MQTT session %r not dropped: %s", client_id, exc)

    def drop_soon(self, client_id: str, device: Device) -> None:
        """The same, not waited for: with the other connects of the moment."""
        self._to_drop[client_id] = device.tenant_id
        if self._dropper is None or self._dropper.done():
            self._dropper = self._spawn(self._drop_gathered())

    async def _drop_gathered(self) -> None:
        while self._to_drop:
            await asyncio.sleep(0)  # the connects being handled now join this delete
            batch, self._to_drop = self._to_drop, {}
            self._dropping = set(batch)
            try:
                await self.store.delete_mqtt_sessions(
                    [(tenant, client_id) for client_id, tenant in batch.items()]
                )
            except StorageUnavailable as exc:
                log.warning("%d MQTT sessions not dropped: %s", len(batch), exc)
            except Exception:  # the next connects' deletes must still be written
                log.exception("%d MQTT sessions not dropped", len(batch))
            finally:
                self._dropping = set()

    async def _settle(self, client_id: str) -> None:
        """Wait until a delete asked for this client id earlier is written."""
        while client_id in self._to_drop or client_id in self._dropping:
            dropper = self._dropper
            if dropper is None or dropper.done():
                return  # cancelled with the endpoint: nothing will write it
            await asyncio.wait([dropper])  # not cancelled with this caller, nor raising
