"""Device registry: resolves tokens and ids to devices (cached) and owns device changes.

Every change to a device goes through here so the cache is invalidated and the live bus
hears of it (the OPC UA address space follows these events). Entries also expire after a
few seconds so that changes made by another platform process are seen soon.

Hot path: an entry that has just expired is still answered from the cache while one
background task reads it again (stale-while-revalidate, expiry times jittered), and lookups
that must wait for the store run a few at a time. Otherwise every cached device expired at
once every few seconds and a thousand lookups queued for pool connections ahead of the
batch writer, which then waited seconds to commit.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import deque
from uuid import UUID

from iiot.bus import DeviceEvent, LiveBus
from iiot.errors import AuthenticationError, NotFound, StorageUnavailable
from iiot.model import Device
from iiot.security import hash_token, new_device_token
from iiot.storage.base import Scope, Store

__all__ = ["DeviceRegistry"]

log = logging.getLogger(__name__)

# Store lookups of uncached devices at once; the rest of the pool stays free for the writer.
_MAX_LOOKUPS = 4
# Background refreshes of expired entries run one after another in this many tasks.
_REFRESHERS = 1
# Unknown tokens remembered (bounded): a flood of bad tokens (a CoAP flood costs the sender
# one datagram each) would otherwise be one database query per message. A token is random,
# so a new device's token cannot have been tried before it existed.
_UNKNOWN_TTL_S = 5.0
_MAX_UNKNOWN = 10_000


class DeviceRegistry:
    """Token → device resolution with a small time-bounded cache."""

    def __init__(self, store: Store, bus: LiveBus, ttl_s: float = 5.0, max_entries: int = 100_000):
        self._store = store
        self._bus = bus
        self._ttl = ttl_s
        self._max = max_entries
        self._by_token: dict[str, tuple[float, Device]] = {}
        self._by_id: dict[UUID, tuple[float, Device]] = {}
        # device id -> its cached token hashes: forgetting a device does not scan the cache
        self._tokens_of: dict[UUID, set[str]] = {}
        self._unknown: dict[str, float] = {}  # token hash -> until when it is known unknown
        self.max_unknown = _MAX_UNKNOWN
        self._lookups = asyncio.Semaphore(_MAX_LOOKUPS)
        self._stale: deque[tuple[str | None, UUID]] = deque()  # entries to read again
        self._stale_keys: set[tuple[str | None, UUID]] = set()
        self._refreshers: set[asyncio.Task[None]] = set()

    # --- resolution (hot path) ---------------------------------------------------------
    async def authenticate(self, token: str) -> Device:
        """The device owning this token; `AuthenticationError` if none does."""
        device = self.cached_token(token)
        if device is not None:
            return device
        token_hash = hash_token(token)
        now = time.monotonic()
        until = self._unknown.get(token_hash)
        if until is not None:
            if until > now:
                raise AuthenticationError("unknown device token")
            del self._unknown[token_hash]
        async with self._lookups:
            found = await self._store.find_device_by_token_hash(token_hash)
        if found is None:
            self._remember_unknown(token_hash, time.monotonic())
            raise AuthenticationError("unknown device token")
        self._remember(token_hash, found, time.monotonic())
        return found

    def _remember_unknown(self, token_hash: str, now: float) -> None:
        unknown = self._unknown
        if len(unknown) >= self.max_unknown:
            # Oldest first (insertion order); expired ones are among them.
            for key in list(itertools.islice(unknown, len(unknown) // 2 + 1)):
                del unknown[key]
        unknown[token_hash] = now + _UNKNOWN_TTL_S

    async def authenticate_id(self, device_id: str, token: str) -> Device:
        """The device with this id if the token is its own (MQTT username/password)."""
        device = await self.authenticate(token)
        if str(device.id) != device_id:
            raise AuthenticationError("device id and token do not match")
        return device

    def cached_token(self, token: str) -> Device | None:
        """The device owning this token if it is cached (as `cached`); None otherwise."""
        token_hash = hash_token(token)
        return self._from_cache(self._by_token.get(token_hash), token_hash)

    def cached(self, device_id: UUID) -> Device | None:
        """The device if it is cached (fresh, or just expired: then it is read again)."""
        return self._from_cache(self._by_id.get(device_id), None)

    def _from_cache(
        self, entry: tuple[float, Device] | None, token_hash: str | None
    ) -> Device | None:
        if entry is None:
            return None
        expires, device = entry
        now = time.monotonic()
        if expires > now:
            return device
        if expires + self._ttl > now:
            self._refresh_later(token_hash, device.id)
            return device
        return None

    async def get(self, device_id: UUID) -> Device:
        """A device by id, across tenants (for adapters that learn the id from a topic)."""
        device = self.cached(device_id)
        if device is not None:
            return device
        async with self._lookups:
            device = await self._store.get_device(None, device_id)
        self._remember(None, device, time.monotonic())
        return device

    def _remember(self, token_hash: str | None, device: Device, now: float) -> None:
        if len(self._by_token) >= self._max or len(self._by_id) >= self._max:
            self._by_token.clear()
            self._by_id.clear()
            self._tokens_of.clear()
        # Jittered: devices cached together do not all expire together.
        expires = now + self._ttl * random.uniform(0.75, 1.0)
        if token_hash is not None:
            self._by_token[token_hash] = (expires, device)
            self._tokens_of.setdefault(device.id, set()).add(token_hash)
            self._unknown.pop(token_hash, None)
        self._by_id[device.id] = (expires, device)

    def _refresh_later(self, token_hash: str | None, device_id: UUID) -> None:
        """Queue an expired entry to be read again in the background (once)."""
        key = (token_hash, device_id)
        if key in self._stale_keys:
            return
        self._stale_keys.add(key)
        self._stale.append(key)
        if len(self._refreshers) < _REFRESHERS:
            task = asyncio.get_running_loop().create_task(self._refresh())
            self._refreshers.add(task)
            task.add_done_callback(self._refreshers.discard)

    async def _refresh(self) -> None:
        while self._stale:
            key = self._stale.popleft()
            token_hash, device_id = key
            try:
                if token_hash is None:
                    try:
                        device: Device | None = await self._store.get_device(None, device_id)
                    except NotFound:
                        device = None
                else:
                    device = await self._store.find_device_by_token_hash(token_hash)
            except StorageUnavailable as exc:
                # Served stale a little longer; after twice the TTL lookups wait for the store.
                log.debug("device cache refresh failed: %s", exc)
                continue
            except RuntimeError:  # the store is closed: the platform is stopping
                self._stale.clear()
                self._stale_keys.clear()
                return
            finally:
                self._stale_keys.discard(key)
            if device is None or device.id != device_id:
                self._drop(token_hash, device_id)
            else:
                self._remember(token_hash, device, time.monotonic())

    def _drop(self, token_hash: str | None, device_id: UUID) -> None:
        """The entry is gone from the store (device deleted, token rotated elsewhere)."""
        if token_hash is None:
            self._by_id.pop(device_id, None)
        else:
            self._by_token.pop(token_hash, None)
            hashes = self._tokens_of.get(device_id)
            if hashes is not None:
                hashes.discard(token_hash)
                if not hashes:
                    del self._tokens_of[device_id]

    def forget(self, device_id: UUID) -> None:
        """Drop a device from the cache (after it changed)."""
        self._by_id.pop(device_id, None)
        for token_hash in self._tokens_of.pop(device_id, ()):
            self._by_token.pop(token_hash, None)

    # --- changes -----------------------------------------------------------------------
    async def create_device(
        self,
        tenant_id: UUID,
        name: str,
        *,
        type: str = "default",
        gateway_id: UUID | None = None,
    ) -> tuple[Device, str]:
        """Create a device; returns it with its token (shown once, stored as a hash)."""
        token = new_device_token()
        token_hash = hash_token(token)
        device = await self._store.create_device(
            tenant_id, name, token_hash, type=type, gateway_id=gateway_id
        )
        self._remember(token_hash, device, time.monotonic())
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
        self,
        scope: Scope,
        device_id: UUID,
        *,
        name: str | None = None,
        status: str | None = None,
        type: str | None = None,
    ) -> Device:
        """Rename a device, change its status or its type."""
        device = await self._store.update_device(
            scope, device_id, name=name, status=status, type=type
        )
        self.forget(device_id)
        self._bus.publish(DeviceEvent("updated", device))
        return device

    async def delete_device(self, scope: Scope, device_id: UUID) -> None:
        """Delete a device with its telemetry."""
        device = await self._store.get_device(scope, device_id)
        await self._store.delete_device(scope, device_id)
        self.forget(device_id)
        self._bus.publish(DeviceEvent("deleted", device))
