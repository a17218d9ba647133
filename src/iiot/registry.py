"""Device registry: resolves tokens and ids to devices (cached) and owns device changes.

Every change to a device goes through here so the cache is invalidated and the live bus
hears of it (the OPC UA address space follows these events). Entries also expire after a
few seconds so that changes made by another platform process are seen soon.
"""

from __future__ import annotations

import time
from uuid import UUID

from iiot.bus import DeviceEvent, LiveBus
from iiot.errors import AuthenticationError
from iiot.model import Device
from iiot.security import hash_token, new_device_token
from iiot.storage.base import Scope, Store

__all__ = ["DeviceRegistry"]


class DeviceRegistry:
    """Token → device resolution with a small time-bounded cache."""

    def __init__(self, store: Store, bus: LiveBus, ttl_s: float = 5.0, max_entries: int = 100_000):
        self._store = store
        self._bus = bus
        self._ttl = ttl_s
        self._max = max_entries
        self._by_token: dict[str, tuple[float, Device]] = {}
        self._by_id: dict[UUID, tuple[float, Device]] = {}

    # --- resolution (hot path) ---------------------------------------------------------
    async def authenticate(self, token: str) -> Device:
        """The device owning this token; `AuthenticationError` if none does."""
        token_hash = hash_token(token)
        now = time.monotonic()
        cached = self._by_token.get(token_hash)
        if cached is not None and cached[0] > now:
            return cached[1]
        device = await self._store.find_device_by_token_hash(token_hash)
        if device is None:
            raise AuthenticationError("unknown device token")
        self._remember(token_hash, device, now)
        return device

    async def authenticate_id(self, device_id: str, token: str) -> Device:
        """The device with this id if the token is its own (MQTT username/password)."""
        device = await self.authenticate(token)
        if str(device.id) != device_id:
            raise AuthenticationError("device id and token do not match")
        return device

    async def get(self, device_id: UUID) -> Device:
        """A device by id, across tenants (for adapters that learn the id from a topic)."""
        now = time.monotonic()
        cached = self._by_id.get(device_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        device = await self._store.get_device(None, device_id)
        self._remember(None, device, now)
        return device

    def _remember(self, token_hash: str | None, device: Device, now: float) -> None:
        if len(self._by_token) >= self._max or len(self._by_id) >= self._max:
            self._by_token.clear()
            self._by_id.clear()
        expires = now + self._ttl
        if token_hash is not None:
            self._by_token[token_hash] = (expires, device)
        self._by_id[device.id] = (expires, device)

    def forget(self, device_id: UUID) -> None:
        """Drop a device from the cache (after it changed)."""
        self._by_id.pop(device_id, None)
        stale = [h for h, (_, d) in self._by_token.items() if d.id == device_id]
        for token_hash in stale:
            del self._by_token[token_hash]

    # --- changes -----------------------------------------------------------------------
    async def create_device(self, tenant_id: UUID, name: str) -> tuple[Device, str]:
        """Create a device; returns it with its token (shown once, stored as a hash)."""
        token = new_device_token()
        device = await self._store.create_device(tenant_id, name, hash_token(token))
        self._bus.publish(DeviceEvent("created", device))
        return device, token

    async def rotate_token(self, scope: Scope, device_id: UUID) -> tuple[Device, str]:
        """Give a device a new token; the old one stops working at once."""
        token = new_device_token()
        await self._store.set_device_token_hash(scope, device_id, hash_token(token))
        self.forget(device_id)
        device = await self._store.get_device(scope, device_id)
        self._bus.publish(DeviceEvent("updated", device))
        return device, token

    async def update_device(
        self, scope: Scope, device_id: UUID, *, name: str | None = None, status: str | None = None
    ) -> Device:
        """Rename a device or change its status."""
        device = await self._store.update_device(scope, device_id, name=name, status=status)
        self.forget(device_id)
        self._bus.publish(DeviceEvent("updated", device))
        return device

    async def delete_device(self, scope: Scope, device_id: UUID) -> None:
        """Delete a device with its telemetry."""
        device = await self._store.get_device(scope, device_id)
        await self._store.delete_device(scope, device_id)
        self.forget(device_id)
        self._bus.publish(DeviceEvent("deleted", device))
