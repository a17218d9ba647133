"""`iiot tenant ...`: manage tenants."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from iiot.cli.common import with_store
from iiot.config import Settings
from iiot.storage.base import Store

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add `iiot tenant` to the top-level parser."""
    tenant = sub.add_parser("tenant", help="manage tenants", description="Manage tenants.")
    tenant_sub = tenant.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = tenant_sub.add_parser("create", help="create a tenant", description="Create a tenant.")
    create.add_argument("name")
    create.set_defaults(handler=_cmd_create)


def _cmd_create(settings: Settings, args: argparse.Namespace) -> None:
    async def action(store: Store) -> None:
        tenant = await store.create_tenant(args.name)
        print(f"tenant {tenant.name} id={tenant.id}")

    asyncio.run(with_store(settings, action))
