"""Persistent MQTT sessions: the subscriptions of a client id kept while it is away.

A device connecting with a persistent session (3.1.1 clean session 0; v5 clean start 0 and a
session expiry) finds its subscriptions again, and with them its command and attribute
links. They are kept in the database, so a restarted platform (or another platform process
behind the same port) knows them too.
"""

from __future__ import annotations

import logging

from iiot.errors import StorageUnavailable
from iiot.model import Device
from iiot.services import Services

__all__ = ["SessionStore"]

log = logging.getLogger("iiot.adapters.mqtt_server")


class SessionStore:
    """Subscriptions by client id, for the device that owns the session."""

    def __init__(self, services: Services) -> None:
        self.store = services.store

    async def load(self, client_id: str, device: Device) -> dict[str, int] | None:
        """The saved subscriptions of this client id if the device owns them."""
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
        try:
            await self.store.save_mqtt_session(
                device.tenant_id, client_id, device.id, dict(subscriptions)
            )
        except StorageUnavailable as exc:
            log.warning("MQTT session %r not saved: %s", client_id, exc)

    async def drop(self, client_id: str, device: Device) -> None:
        """A clean session replaces whatever was saved."""
        try:
            await self.store.delete_mqtt_session(device.tenant_id, client_id)
        except StorageUnavailable as exc:
            log.warning("MQTT session %r not dropped: %s", client_id, exc)
