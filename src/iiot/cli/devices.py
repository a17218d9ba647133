"""`iiot device ...`: create, list, show, disable, enable, delete devices, rotate tokens.

Changes reach a running platform at once (`iiot.changefeed`): its OPC UA address space and
device cache follow them as they follow the REST API's.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any
from uuid import UUID

from iiot.cli.common import all_pages, changes, find_device, find_tenant, with_store
from iiot.cli.output import add_json_flag, iso_time, print_record, print_rows
from iiot.config import Settings
from iiot.errors import InvalidRequest
from iiot.model import Device
from iiot.storage.base import Store

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add `iiot device` to the top-level parser."""
    device = sub.add_parser("device", help="manage devices", description="Manage devices.")
    device_sub = device.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = device_sub.add_parser(
        "create",
        help="create a device and print its token once",
        description="Create a device and print its access token (shown only once).",
    )
    create.add_argument("--tenant", required=True, help="tenant name or id")
    create.add_argument("--name", required=True)
    rotate = device_sub.add_parser(
        "rotate",
        help="give a device a new token and print it once",
        description="Replace a device's access token (the old one stops working at once).",
    )
    rotate.add_argument("--id", required=True, help="the device id")
    for command in (create, rotate):
        command.add_argument(
            "--mosquitto-passwd",
            metavar="FILE",
            help="also write the device's login into this Mosquitto password file "
            "(username = device id, password = token; reload Mosquitto afterwards)",
        )
        command.set_defaults(handler=_cmd_create_or_rotate)

    listing = device_sub.add_parser("list", help="list devices", description="List devices.")
    listing.add_argument("--tenant", help="only this tenant's devices (name or id)")
    add_json_flag(listing)
    listing.set_defaults(handler=_cmd_list)

    show = device_sub.add_parser(
        "show", help="show a device and its latest values", description="Show a device."
    )
    _device_ref(show)
    add_json_flag(show)
    show.set_defaults(handler=_cmd_show)

    for action, text in (
        ("disable", "refuse a device's data from now on"),
        ("enable", "accept a disabled device's data again"),
    ):
        command = device_sub.add_parser(action, help=text, description=text[0].upper() + text[1:])
        _device_ref(command)
        command.set_defaults(handler=_cmd_enable_disable)

    delete = device_sub.add_parser(
        "delete",
        help="delete a device with its telemetry",
        description="Delete a device with its telemetry (no undo).",
    )
    _device_ref(delete)
    delete.add_argument("--yes", action="store_true", help="confirm the deletion")
    delete.set_defaults(handler=_cmd_delete)


def _device_ref(parser: Any) -> None:
    parser.add_argument("device", help="device id, or name with --tenant")
    parser.add_argument("--tenant", help="the tenant (name or id) of a device given by name")


def _record(device: Device, tenants: dict[UUID, str]) -> dict[str, Any]:
    return {
        "id": str(device.id),
        "name": device.name,
        "tenant": tenants.get(device.tenant_id),
        "tenant_id": str(device.tenant_id),
        "status": device.status,
        "created_at": iso_time(device.created_at),
    }


async def _tenant_names(store: Store) -> dict[UUID, str]:
    tenants = await all_pages(lambda limit, offset: store.list_tenants(None, limit, offset))
    return {t.id: t.name for t in tenants}


def _cmd_create_or_rotate(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.registry import DeviceRegistry

    async def action(store: Store) -> None:
        async with changes(settings) as bus:
            registry = DeviceRegistry(store, bus)
            if args.action == "create":
                tenant = await find_tenant(store, args.tenant)
                device, token = await registry.create_device(tenant.id, args.name)
            else:
                try:
                    device_id = UUID(args.id)
                except ValueError:
                    raise InvalidRequest(f"--id {args.id!r} is not a device id (a UUID)") from None
                device, token = await registry.rotate_token(None, device_id)
        print(f"device {device.name} id={device.id}")
        print(f"token {token}")
        print("(the token is shown only now; rotate it if it is lost)")
        if args.mosquitto_passwd:
            from iiot.adapters.mosquitto_security import update_password_file

            update_password_file(Path(args.mosquitto_passwd), str(device.id), token)
            print(f"login written to {args.mosquitto_passwd}; reload Mosquitto (kill -HUP)")

    asyncio.run(with_store(settings, action))


def _cmd_list(settings: Settings, args: argparse.Namespace) -> None:
    async def action(store: Store) -> None:
        scope = (await find_tenant(store, args.tenant)).id if args.tenant else None
        devices = await all_pages(lambda limit, offset: store.list_devices(scope, limit, offset))
        names = await _tenant_names(store)
        columns = ("name", "id", "tenant", "status", "created_at")
        print_rows([_record(d, names) for d in devices], columns, args.json)

    asyncio.run(with_store(settings, action))


def _cmd_show(settings: Settings, args: argparse.Namespace) -> None:
    async def action(store: Store) -> None:
        device = await find_device(store, args.device, args.tenant)
        record = _record(device, await _tenant_names(store))
        latest = await store.latest(None, device.id)
        record["latest"] = {
            key: f"{point.value!r} at {iso_time(point.ts)}"
            if not args.json
            else {
                "ts": point.ts,
                "value": point.value,
            }
            for key, point in sorted(latest.items())
        }
        print_record(record, args.json)

    asyncio.run(with_store(settings, action))


def _cmd_enable_disable(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.registry import DeviceRegistry

    status = "disabled" if args.action == "disable" else "active"

    async def action(store: Store) -> None:
        async with changes(settings) as bus:
            device = await find_device(store, args.device, args.tenant)
            device = await DeviceRegistry(store, bus).update_device(None, device.id, status=status)
        print(f"device {device.name} id={device.id} status={device.status}")

    asyncio.run(with_store(settings, action))


def _cmd_delete(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.registry import DeviceRegistry

    async def action(store: Store) -> None:
        device = await find_device(store, args.device, args.tenant)
        if not args.yes:
            raise InvalidRequest(
                f"this deletes device {device.name!r} ({device.id}) with its telemetry: "
                "add --yes to confirm"
            )
        async with changes(settings) as bus:
            await DeviceRegistry(store, bus).delete_device(None, device.id)
        print(f"device {device.name} id={device.id} deleted")

    asyncio.run(with_store(settings, action))
