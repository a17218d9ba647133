"""`iiot user ...`: manage users."""

from __future__ import annotations

import argparse
import asyncio
import getpass
from typing import Any

from iiot.cli.common import find_tenant, with_store
from iiot.config import Settings
from iiot.errors import InvalidRequest
from iiot.model import Role
from iiot.storage.base import Store

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add `iiot user` to the top-level parser."""
    user = sub.add_parser("user", help="manage users", description="Manage users.")
    user_sub = user.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = user_sub.add_parser("create", help="create a user", description="Create a user.")
    create.add_argument("--username", required=True)
    create.add_argument("--password", help="prompted for when omitted")
    create.add_argument("--role", choices=[r.value for r in Role], default="tenant_user")
    create.add_argument("--tenant", help="tenant name or id (not for sysadmin)")
    create.set_defaults(handler=_cmd_create)


def _cmd_create(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.security import hash_password

    role = Role(args.role)
    if role is Role.SYSADMIN and args.tenant:
        raise InvalidRequest("a sysadmin belongs to no tenant: leave out --tenant")
    if role is not Role.SYSADMIN and not args.tenant:
        raise InvalidRequest(f"a {role.value} needs --tenant NAME")
    password = args.password
    if password is None:
        password = getpass.getpass(f"password for {args.username}: ")
    if len(password) < 8 or len(password.encode()) > 72:
        raise InvalidRequest("the password must be 8 to 72 bytes long")

    async def action(store: Store) -> None:
        tenant_id = (await find_tenant(store, args.tenant)).id if args.tenant else None
        user = await store.create_user(
            tenant_id, args.username, hash_password(password, settings.bcrypt_rounds), role
        )
        print(f"user {user.username} id={user.id} role={user.role.value}")

    asyncio.run(with_store(settings, action))
