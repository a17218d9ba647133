"""`iiot user ...`: create, list, show, disable, enable, delete users, reset passwords.

Passwords never come from the command line (the process list and shell history would
show them): a prompt, `IIOT_NEW_PASSWORD`, or one line on standard input.

A disabled user's password hash is kept behind a `!` (as in /etc/shadow): no password
matches it, and enabling the user removes the `!`, so the old password works again.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from iiot.cli.common import (
    PASSWORD_ENV,
    all_pages,
    find_tenant,
    find_user,
    read_new_password,
    with_store,
)
from iiot.cli.output import add_json_flag, iso_time, print_record, print_rows
from iiot.config import Settings
from iiot.errors import InvalidRequest
from iiot.model import Role, User
from iiot.security import DISABLED_MARK, is_disabled_hash
from iiot.storage.base import Store

__all__ = ["is_locked", "lock_user", "register"]

_LOCK = DISABLED_MARK


def register(sub: Any) -> None:
    """Add `iiot user` to the top-level parser."""
    user = sub.add_parser("user", help="manage users", description="Manage users.")
    user_sub = user.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = user_sub.add_parser(
        "create",
        help="create a user",
        description=f"Create a user. The password is prompted for, or read from {PASSWORD_ENV} "
        "or from standard input.",
    )
    create.add_argument("--username", required=True)
    create.add_argument("--password", help=argparse.SUPPRESS)  # refused with an explanation
    create.add_argument("--role", choices=[r.value for r in Role], default="tenant_user")
    create.add_argument("--tenant", help="tenant name or id (not for sysadmin)")
    create.set_defaults(handler=_cmd_create)

    listing = user_sub.add_parser("list", help="list users", description="List users.")
    listing.add_argument("--tenant", help="only this tenant's users (name or id)")
    add_json_flag(listing)
    listing.set_defaults(handler=_cmd_list)

    show = user_sub.add_parser("show", help="show one user", description="Show a user.")
    show.add_argument("user", help="username or id")
    add_json_flag(show)
    show.set_defaults(handler=_cmd_show)

    for action, text in (
        ("disable", "stop a user from logging in (the password is kept)"),
        ("enable", "let a disabled user log in again with the same password"),
    ):
        command = user_sub.add_parser(action, help=text, description=text[0].upper() + text[1:])
        command.add_argument("user", help="username or id")
        command.set_defaults(handler=_cmd_enable_disable)

    delete = user_sub.add_parser("delete", help="delete a user", description="Delete a user.")
    delete.add_argument("user", help="username or id")
    delete.add_argument("--yes", action="store_true", help="confirm the deletion")
    delete.set_defaults(handler=_cmd_delete)

    reset = user_sub.add_parser(
        "reset-password",
        help="set a new password for a user",
        description=f"Set a user's password: prompted for (twice), or read from {PASSWORD_ENV} "
        "or from one line of standard input. Never given on the command line.",
    )
    reset.add_argument("user", help="username or id")
    reset.set_defaults(handler=_cmd_reset_password)


def is_locked(user: User) -> bool:
    """Whether the user is disabled."""
    return is_disabled_hash(user.password_hash)


async def lock_user(store: Store, user: User, *, locked: bool) -> User:
    """Disable or enable a user's login, keeping the password."""
    if is_locked(user) == locked:
        return user
    new_hash = _LOCK + user.password_hash if locked else user.password_hash[len(_LOCK) :]
    return await store.update_user(None, user.id, password_hash=new_hash)


def _record(user: User, tenants: dict[Any, str]) -> dict[str, Any]:
    return {
        "id": str(user.id),
        "username": user.username,
        "role": user.role.value,
        "tenant": tenants.get(user.tenant_id) if user.tenant_id else None,
        "tenant_id": str(user.tenant_id) if user.tenant_id else None,
        "status": "disabled" if is_locked(user) else "active",
        "created_at": iso_time(user.created_at),
    }


async def _tenant_names(store: Store) -> dict[Any, str]:
    tenants = await all_pages(lambda limit, offset: store.list_tenants(None, limit, offset))
    return {t.id: t.name for t in tenants}


async def _refuse_last_admin(store: Store, user: User, what: str) -> None:
    """Nobody could administer the platform after this: refuse."""
    if user.role is not Role.SYSADMIN or is_locked(user):
        return
    users = await all_pages(lambda limit, offset: store.list_users(None, limit, offset))
    others = [u for u in users if u.role is Role.SYSADMIN and not is_locked(u) and u != user]
    if not others:
        raise InvalidRequest(
            f"{user.username!r} is the only active sysadmin; create another before you {what} it"
        )


def _cmd_create(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.security import hash_password

    if args.password is not None:
        raise InvalidRequest(
            "--password is not accepted (the process list and shell history would show it): "
            f"answer the prompt, or set {PASSWORD_ENV}, or pipe it on standard input"
        )
    role = Role(args.role)
    if role is Role.SYSADMIN and args.tenant:
        raise InvalidRequest("a sysadmin belongs to no tenant: leave out --tenant")
    if role is not Role.SYSADMIN and not args.tenant:
        raise InvalidRequest(f"a {role.value} needs --tenant NAME")

    async def action(store: Store) -> None:
        tenant_id = (await find_tenant(store, args.tenant)).id if args.tenant else None
        password = read_new_password(args.username)
        user = await store.create_user(
            tenant_id, args.username, hash_password(password, settings.bcrypt_rounds), role
        )
        print(f"user {user.username} id={user.id} role={user.role.value}")

    asyncio.run(with_store(settings, action))


def _cmd_list(settings: Settings, args: argparse.Namespace) -> None:
    async def action(store: Store) -> None:
        scope = (await find_tenant(store, args.tenant)).id if args.tenant else None
        users = await all_pages(lambda limit, offset: store.list_users(scope, limit, offset))
        names = await _tenant_names(store)
        columns = ("username", "id", "role", "tenant", "status", "created_at")
        print_rows([_record(u, names) for u in users], columns, args.json)

    asyncio.run(with_store(settings, action))


def _cmd_show(settings: Settings, args: argparse.Namespace) -> None:
    async def action(store: Store) -> None:
        user = await find_user(store, args.user)
        print_record(_record(user, await _tenant_names(store)), args.json)

    asyncio.run(with_store(settings, action))


def _cmd_enable_disable(settings: Settings, args: argparse.Namespace) -> None:
    disable = args.action == "disable"

    async def action(store: Store) -> None:
        user = await find_user(store, args.user)
        if disable:
            await _refuse_last_admin(store, user, "disable")
        await lock_user(store, user, locked=disable)
        print(f"user {user.username} {'disabled' if disable else 'enabled'}")

    asyncio.run(with_store(settings, action))


def _cmd_delete(settings: Settings, args: argparse.Namespace) -> None:
    async def action(store: Store) -> None:
        user = await find_user(store, args.user)
        if not args.yes:
            raise InvalidRequest(f"this deletes user {user.username!r}: add --yes to confirm")
        await _refuse_last_admin(store, user, "delete")
        await store.delete_user(None, user.id)
        print(f"user {user.username} deleted")

    asyncio.run(with_store(settings, action))


def _cmd_reset_password(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.security import hash_password

    async def action(store: Store) -> None:
        user = await find_user(store, args.user)
        password = read_new_password(user.username)
        new_hash = hash_password(password, settings.bcrypt_rounds)
        if is_locked(user):
            new_hash = _LOCK + new_hash  # a disabled user stays disabled
        await store.update_user(None, user.id, password_hash=new_hash)
        note = " (still disabled: `iiot user enable` lets it log in)" if is_locked(user) else ""
        print(f"password of {user.username} changed{note}")

    asyncio.run(with_store(settings, action))
