"""`iiot tenant ...`: create, list, show, disable, enable and delete tenants."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from iiot.cli.common import all_pages, changes, find_tenant, with_store
from iiot.cli.output import add_json_flag, iso_time, print_record, print_rows
from iiot.cli.users import lock_user
from iiot.config import Settings
from iiot.errors import InvalidRequest
from iiot.model import Device, Tenant
from iiot.storage.base import Store

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add `iiot tenant` to the top-level parser."""
    tenant = sub.add_parser("tenant", help="manage tenants", description="Manage tenants.")
    tenant_sub = tenant.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = tenant_sub.add_parser("create", help="create a tenant", description="Create a tenant.")
    create.add_argument("name")
    create.set_defaults(handler=_cmd_create)

    listing = tenant_sub.add_parser("list", help="list tenants", description="List tenants.")
    add_json_flag(listing)
    listing.set_defaults(handler=_cmd_list)

    show = tenant_sub.add_parser(
        "show", help="show one tenant", description="Show a tenant with its counts."
    )
    show.add_argument("tenant", help="tenant name or id")
    add_json_flag(show)
    show.set_defaults(handler=_cmd_show)

    for action, text in (
        ("disable", "disable every device of the tenant and lock its users out"),
        ("enable", "enable every device of the tenant and let its users log in again"),
    ):
        command = tenant_sub.add_parser(action, help=text, description=text[0].upper() + text[1:])
        command.add_argument("tenant", help="tenant name or id")
        command.set_defaults(handler=_cmd_enable_disable)

    delete = tenant_sub.add_parser(
        "delete",
        help="delete a tenant with its users, devices and telemetry",
        description="Delete a tenant with its users, devices and telemetry (no undo).",
    )
    delete.add_argument("tenant", help="tenant name or id")
    delete.add_argument("--yes", action="store_true", help="confirm the deletion")
    delete.set_defaults(handler=_cmd_delete)


def _record(tenant: Tenant) -> dict[str, Any]:
    return {
        "id": str(tenant.id),
        "name": tenant.name,
        "retention_days": tenant.retention_days,
        "created_at": iso_time(tenant.created_at),
    }


async def _devices(store: Store, tenant: Tenant) -> list[Device]:
    return await all_pages(lambda limit, offset: store.list_devices(tenant.id, limit, offset))


def _cmd_create(settings: Settings, args: argparse.Namespace) -> None:
    async def action(store: Store) -> None:
        tenant = await store.create_tenant(args.name)
        print(f"tenant {tenant.name} id={tenant.id}")

    asyncio.run(with_store(settings, action))


def _cmd_list(settings: Settings, args: argparse.Namespace) -> None:
    async def action(store: Store) -> None:
        tenants = await all_pages(lambda limit, offset: store.list_tenants(None, limit, offset))
        columns = ("name", "id", "retention_days", "created_at")
        print_rows([_record(t) for t in tenants], columns, args.json)

    asyncio.run(with_store(settings, action))


def _cmd_show(settings: Settings, args: argparse.Namespace) -> None:
    async def action(store: Store) -> None:
        tenant = await find_tenant(store, args.tenant)
        devices = await _devices(store, tenant)
        users = await store.list_users(tenant.id, 1, 0)
        record = _record(tenant)
        record["devices"] = len(devices)
        record["devices_disabled"] = sum(1 for d in devices if d.disabled)
        record["users"] = users.total
        print_record(record, args.json)

    asyncio.run(with_store(settings, action))


def _cmd_enable_disable(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.registry import DeviceRegistry

    disable = args.action == "disable"
    status = "disabled" if disable else "active"

    async def action(store: Store) -> None:
        async with changes(settings) as bus:
            registry = DeviceRegistry(store, bus)
            tenant = await find_tenant(store, args.tenant)
            changed = 0
            for device in await _devices(store, tenant):
                if device.disabled != disable:
                    await registry.update_device(None, device.id, status=status)
                    changed += 1
            users = await all_pages(
                lambda limit, offset: store.list_users(tenant.id, limit, offset)
            )
            for user in users:
                await lock_user(store, user, locked=disable)
        verb = "disabled" if disable else "enabled"
        print(f"tenant {tenant.name}: {changed} devices {verb}, {len(users)} users {verb}")

    asyncio.run(with_store(settings, action))


def _cmd_delete(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.bus import DeviceEvent, TenantEvent

    async def action(store: Store) -> None:
        tenant = await find_tenant(store, args.tenant)
        devices = await _devices(store, tenant)
        if not args.yes:
            raise InvalidRequest(
                f"this deletes tenant {tenant.name!r} with its {len(devices)} devices, their "
                "telemetry and the tenant's users: add --yes to confirm"
            )
        async with changes(settings) as bus:
            await store.delete_tenant(None, tenant.id)
            # The same events as the REST API's deletion: live views drop the devices first.
            for device in devices:
                bus.publish(DeviceEvent("deleted", device))
            bus.publish(TenantEvent("deleted", tenant))
        print(f"tenant {tenant.name} deleted ({len(devices)} devices)")

    asyncio.run(with_store(settings, action))
