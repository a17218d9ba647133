"""`iiot device ...`: manage devices and their tokens."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any
from uuid import UUID

from iiot.cli.common import find_tenant, with_store
from iiot.config import Settings
from iiot.errors import InvalidRequest
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


def _cmd_create_or_rotate(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.bus import LiveBus
    from iiot.registry import DeviceRegistry

    async def action(store: Store) -> None:
        registry = DeviceRegistry(store, LiveBus())
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
