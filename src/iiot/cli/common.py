"""Helpers shared by the command groups: the database, lookups by name or id, passwords."""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar
from uuid import UUID

from iiot.bus import LiveBus, LiveEvent
from iiot.config import Settings
from iiot.errors import ConfigError, InvalidRequest, NotFound
from iiot.model import Device, Tenant, User
from iiot.storage import open_store
from iiot.storage.base import Page, Store

T = TypeVar("T")

__all__ = [
    "PASSWORD_ENV",
    "all_pages",
    "changes",
    "find_device",
    "find_tenant",
    "find_user",
    "read_new_password",
    "require_database",
    "with_store",
]

# Where `user create` and `user reset-password` read a password without a prompt.
PASSWORD_ENV = "IIOT_NEW_PASSWORD"


def require_database(settings: Settings) -> None:
    """Refuse to go on when the SQLite database does not exist (it would be a new, empty one).

    `iiot run` creates the database; other commands must find the one it uses, so a
    command run from another directory says where it looked instead of starting afresh.
    """
    url = settings.effective_database_url
    if not url.startswith("sqlite:///"):
        return
    path = Path(url[len("sqlite:///") :])
    if path.exists():
        return
    raise ConfigError(
        f"no database at {path.absolute()} ({_where_from(settings)}); start the platform "
        "once with `iiot run`, or point IIOT_DATA_DIR (or IIOT_CONFIG) at the data "
        "directory `iiot run` uses"
    )


def _where_from(settings: Settings) -> str:
    if os.environ.get("IIOT_DATABASE_URL", "").strip():
        return "from IIOT_DATABASE_URL"
    if "IIOT_DATA_DIR" in os.environ:
        return f"IIOT_DATA_DIR={os.environ['IIOT_DATA_DIR']}"
    if os.environ.get("IIOT_CONFIG", "").strip():
        return f"data_dir from IIOT_CONFIG={os.environ['IIOT_CONFIG']}"
    return f"the default data directory ./{settings.data_dir} of the current directory"


async def with_store(
    settings: Settings, action: Callable[[Store], Awaitable[None]], *, create: bool = False
) -> None:
    """Run `action` with the configured store open (an existing one unless `create`)."""
    if not create:
        require_database(settings)
    async with open_store(settings.effective_database_url) as store:
        await action(store)


@asynccontextmanager
async def changes(settings: Settings) -> AsyncIterator[LiveBus]:
    """A live bus whose events reach running platform processes when the block succeeds."""
    from iiot.changefeed import announce

    bus = LiveBus()
    queue = bus.subscribe(0)  # unbounded: a tenant's devices all announce their deletion
    yield bus
    events: list[LiveEvent] = []
    while not queue.empty():
        events.append(queue.get_nowait())
    try:
        await announce(settings, events)
    except Exception as exc:  # the change itself is stored: say so rather than fail
        print(
            f"iiot: warning: the change is stored, but running platforms were not told of "
            f"it at once: {exc}",
            file=sys.stderr,
        )


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


async def find_user(store: Store, ref: str) -> User:
    """A user by username or id; `NotFound` otherwise."""
    user = await store.find_user(ref)
    if user is not None:
        return user
    try:
        return await store.get_user(None, UUID(ref))
    except ValueError:
        raise NotFound(f"no user named {ref!r}") from None


async def find_device(store: Store, ref: str, tenant_ref: str | None) -> Device:
    """A device by id, or by name within `--tenant`; `NotFound` otherwise."""
    try:
        device_id = UUID(ref)
    except ValueError:
        device_id = None
    if device_id is not None:
        return await store.get_device(None, device_id)
    if tenant_ref is None:
        raise InvalidRequest(f"{ref!r} is not a device id: give the id, or --tenant with a name")
    tenant = await find_tenant(store, tenant_ref)
    offset = 0
    while True:
        page = await store.list_devices(tenant.id, 500, offset)
        for device in page.items:
            if device.name == ref:
                return device
        offset += len(page.items)
        if not page.items or offset >= page.total:
            raise NotFound(f"no device named {ref!r} in tenant {tenant.name!r}")


async def all_pages(fetch: Callable[[int, int], Awaitable[Page[T]]]) -> list[T]:
    """Every item of a paged listing (`fetch(limit, offset)`)."""
    items: list[T] = []
    while True:
        page = await fetch(500, len(items))
        items.extend(page.items)
        if not page.items or len(items) >= page.total:
            return items


def read_new_password(username: str) -> str:
    """A new password: from IIOT_NEW_PASSWORD, a prompt (twice), or one line of stdin.

    Never from the command line, where the process list and shell history would show it.
    """
    password = os.environ.get(PASSWORD_ENV)
    if password is None:
        if sys.stdin.isatty():
            password = getpass.getpass(f"new password for {username}: ")
            if getpass.getpass("the same again: ") != password:
                raise InvalidRequest("the two passwords differ; nothing was changed")
        else:
            password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8 or len(password.encode()) > 72:
        raise InvalidRequest(
            f"the password must be 8 to 72 bytes long (read from {_password_source()})"
        )
    return password


def _password_source() -> str:
    if PASSWORD_ENV in os.environ:
        return PASSWORD_ENV
    return "the prompt" if sys.stdin.isatty() else "standard input"
