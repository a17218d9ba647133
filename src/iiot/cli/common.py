"""Helpers shared by the command groups: the store, lookups by name or id."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from uuid import UUID

from iiot.config import Settings
from iiot.errors import NotFound
from iiot.model import Tenant
from iiot.storage import open_store
from iiot.storage.base import Store

__all__ = ["find_tenant", "with_store"]


async def find_tenant(store: Store, ref: str) -> Tenant:
    """A tenant by id or by name; `NotFound` otherwise."""
    try:
        return await store.get_tenant(None, UUID(ref))
    except ValueError:
        pass
    offset = 0
    while True:
        page = await store.list_tenants(None, 500, offset)
        for tenant in page.items:
            if tenant.name == ref:
                return tenant
        offset += len(page.items)
        if not page.items or offset >= page.total:
            raise NotFound(f"no tenant named {ref!r}")


async def with_store(settings: Settings, action: Callable[[Store], Awaitable[None]]) -> None:
    """Run `action` with the configured store open."""
    async with open_store(settings.effective_database_url) as store:
        await action(store)
