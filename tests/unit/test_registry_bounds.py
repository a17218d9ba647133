"""The device registry on a real (SQLite) store: forgetting a device does not scan the
token cache (item 6), and unknown tokens are remembered for a while instead of becoming
one database query each (item 8)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from iiot.bus import LiveBus
from iiot.errors import AuthenticationError
from iiot.registry import DeviceRegistry
from iiot.storage import open_store


class CountingDict(dict[Any, Any]):
    """Counts full scans of a cache."""

    scans = 0

    def items(self) -> Any:
        CountingDict.scans += 1
        return super().items()

    def values(self) -> Any:
        CountingDict.scans += 1
        return super().values()

    def __iter__(self) -> Any:
        CountingDict.scans += 1
        return super().__iter__()


class CountingStore:
    """The real store, with its token lookups counted."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.token_lookups = 0

    async def find_device_by_token_hash(self, token_hash: str) -> Any:
        self.token_lookups += 1
        return await self._store.find_device_by_token_hash(token_hash)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


async def test_forget_uses_a_reverse_index_not_a_scan(tmp_path: Path) -> None:
    async with open_store(f"sqlite:///{tmp_path / 'iiot.db'}") as store:
        tenant = await store.create_tenant("acme")
        registry = DeviceRegistry(store, LiveBus())
        registry._by_token = CountingDict()
        devices = [await registry.create_device(tenant.id, f"d{i}") for i in range(200)]
        for device, token in devices:
            assert registry.cached_token(token) == device
        CountingDict.scans = 0
        for device, _ in devices[:100]:
            registry.forget(device.id)
        assert CountingDict.scans == 0, "forget scanned the whole token cache"
        for _, token in devices[:100]:
            assert registry.cached_token(token) is None
        for device, token in devices[100:]:
            assert registry.cached_token(token) == device


async def test_unknown_tokens_are_cached_negatively(tmp_path: Path) -> None:
    async with open_store(f"sqlite:///{tmp_path / 'iiot.db'}") as real:
        tenant = await real.create_tenant("acme")
        store = CountingStore(real)
        registry = DeviceRegistry(store, LiveBus())  # type: ignore[arg-type]
        for _ in range(100):
            with pytest.raises(AuthenticationError):
                await registry.authenticate("not-a-token")
        assert store.token_lookups == 1
        # A device created (or a token rotated) through the registry is known at once.
        device, token = await registry.create_device(tenant.id, "new")
        assert await registry.authenticate(token) == device
        # The negative cache is bounded.
        for i in range(registry.max_unknown + 50):
            with pytest.raises(AuthenticationError):
                await registry.authenticate(f"made-up-{i}")
        assert len(registry._unknown) <= registry.max_unknown
