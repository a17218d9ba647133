"""Command line: `iiot run`, `iiot migrate`, and shell commands to manage tenants, users, devices.

Commands are thin: they build settings, then call the app or the store. Every error is one
clear line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from uuid import UUID

from iiot import __version__
from iiot.config import Settings, load_settings
from iiot.errors import IIoTError, InvalidRequest, NotFound
from iiot.model import Role, Tenant
from iiot.runtime import tune_garbage_collector
from iiot.storage import open_store
from iiot.storage.base import Store

__all__ = ["main"]

log = logging.getLogger("iiot")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Third-party libraries are chatty at INFO; their warnings still show.
    for name in ("amqtt", "asyncua", "aiocoap", "aio_pika", "aiormq", "uvicorn", "transitions"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iiot", description="Industrial IoT platform. Settings come from IIOT_* variables."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="start the platform", description="Start the platform.")
    run.add_argument(
        "--role",
        choices=["all", "api", "ingest"],
        default="all",
        help="everything in one process (default), only the HTTP API, "
        "or only the ingestion protocols",
    )
    run.add_argument(
        "--workers", type=int, default=1, help="worker processes (with --role api or ingest)"
    )

    sub.add_parser(
        "migrate",
        help="bring the database schema up to date",
        description="Bring the database schema up to date.",
    )
    sub.add_parser("version", help="print the version", description="Print the version.")

    backup = sub.add_parser(
        "backup",
        help="write a consistent backup of the database to a file",
        description="Write a consistent backup of the configured database (taken while the "
        "platform runs) to one file with a manifest and checksums (mode 0600).",
    )
    backup.add_argument("path", help="the backup file to write (replaced atomically)")
    restore = sub.add_parser(
        "restore",
        help="restore a backup file into the database",
        description="Restore a backup (of SQLite or PostgreSQL) into the configured database "
        "(either kind). Refuses a damaged file, and a database that holds data unless "
        "--force. Stop the platform first.",
    )
    restore.add_argument("path", help="the backup file to read")
    restore.add_argument(
        "--force", action="store_true", help="replace the contents of a non-empty database"
    )

    tenant = sub.add_parser("tenant", help="manage tenants", description="Manage tenants.")
    tenant_sub = tenant.add_subparsers(dest="action", required=True, metavar="ACTION")
    tenant_create = tenant_sub.add_parser(
        "create", help="create a tenant", description="Create a tenant."
    )
    tenant_create.add_argument("name")

    user = sub.add_parser("user", help="manage users", description="Manage users.")
    user_sub = user.add_subparsers(dest="action", required=True, metavar="ACTION")
    user_create = user_sub.add_parser("create", help="create a user", description="Create a user.")
    user_create.add_argument("--username", required=True)
    user_create.add_argument("--password", help="prompted for when omitted")
    user_create.add_argument("--role", choices=[r.value for r in Role], default="tenant_user")
    user_create.add_argument("--tenant", help="tenant name or id (not for sysadmin)")

    device = sub.add_parser("device", help="manage devices", description="Manage devices.")
    device_sub = device.add_subparsers(dest="action", required=True, metavar="ACTION")
    device_create = device_sub.add_parser(
        "create",
        help="create a device and print its token once",
        description="Create a device and print its access token (shown only once).",
    )
    device_create.add_argument("--tenant", required=True, help="tenant name or id")
    device_create.add_argument("--name", required=True)
    device_rotate = device_sub.add_parser(
        "rotate",
        help="give a device a new token and print it once",
        description="Replace a device's access token (the old one stops working at once).",
    )
    device_rotate.add_argument("--id", required=True, help="the device id")
    for command in (device_create, device_rotate):
        command.add_argument(
            "--mosquitto-passwd",
            metavar="FILE",
            help="also write the device's login into this Mosquitto password file "
            "(username = device id, password = token; reload Mosquitto afterwards)",
        )

    mosquitto = sub.add_parser(
        "mosquitto",
        help="secure an external Mosquitto for the platform",
        description="Print the files that make Mosquitto enforce the platform's rules.",
    )
    mosquitto_sub = mosquitto.add_subparsers(dest="action", required=True, metavar="ACTION")
    mosquitto_acl = mosquitto_sub.add_parser(
        "acl",
        help="print the topic ACL file",
        description="Print an ACL file: each device may only use devices/{own id}/, the "
        "platform user may read every device's telemetry, anonymous clients nothing.",
    )
    mosquitto_acl.add_argument(
        "--platform-user", default="iiot", help="the user in IIOT_MQTT_URL (default: iiot)"
    )
    return parser


async def _find_tenant(store: Store, ref: str) -> Tenant:
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


async def _with_store(settings: Settings, action: Callable[[Store], Awaitable[None]]) -> None:
    async with open_store(settings.effective_database_url) as store:
        await action(store)


def _cmd_migrate(settings: Settings, args: argparse.Namespace) -> None:
    async def action(store: Store) -> None:
        print(f"database schema is up to date ({settings.effective_database_url.split(':')[0]})")

    asyncio.run(_with_store(settings, action))


def _cmd_tenant(settings: Settings, args: argparse.Namespace) -> None:
    async def action(store: Store) -> None:
        tenant = await store.create_tenant(args.name)
        print(f"tenant {tenant.name} id={tenant.id}")

    asyncio.run(_with_store(settings, action))


def _cmd_user(settings: Settings, args: argparse.Namespace) -> None:
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
        tenant_id = (await _find_tenant(store, args.tenant)).id if args.tenant else None
        user = await store.create_user(
            tenant_id, args.username, hash_password(password, settings.bcrypt_rounds), role
        )
        print(f"user {user.username} id={user.id} role={user.role.value}")

    asyncio.run(_with_store(settings, action))


def _cmd_device(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.bus import LiveBus
    from iiot.registry import DeviceRegistry

    async def action(store: Store) -> None:
        registry = DeviceRegistry(store, LiveBus())
        if args.action == "create":
            tenant = await _find_tenant(store, args.tenant)
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

    asyncio.run(_with_store(settings, action))


def _cmd_mosquitto(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.adapters.mosquitto_security import acl_file

    print(acl_file(args.platform_user), end="")


def _cmd_run(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.app import run_platform

    if args.workers < 1:
        raise InvalidRequest(f"--workers {args.workers}: expected 1 or more")
    if args.workers > 1:
        from iiot.workers import run_workers

        run_workers(settings, args.role, args.workers)
        return
    tune_garbage_collector()
    with asyncio.Runner(loop_factory=_event_loop_factory(args.role)) as runner:
        runner.run(run_platform(settings, args.role))


def _event_loop_factory(role: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop of a platform process: uvloop for the API role when installed.

    An API process spends much of its CPU on socket I/O and callbacks, which uvloop does
    in C (figures: docs/performance.md). Ingestion roles keep the default loop: their
    protocol libraries (aiocoap, asyncua, amqtt) are tested on it.
    """
    if role != "api":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _cmd_backup(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.backup import backup

    manifest = asyncio.run(backup(settings.effective_database_url, Path(args.path)))
    print(f"backup written to {args.path}: {manifest.summary()}")


def _cmd_restore(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.backup import restore

    url = settings.effective_database_url
    manifest = asyncio.run(restore(url, Path(args.path), force=args.force))
    print(f"restored {args.path} into {url.split(':')[0]}: {manifest.summary()}")


_COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], None]] = {
    "run": _cmd_run,
    "backup": _cmd_backup,
    "restore": _cmd_restore,
    "migrate": _cmd_migrate,
    "tenant": _cmd_tenant,
    "user": _cmd_user,
    "device": _cmd_device,
    "mosquitto": _cmd_mosquitto,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `iiot` command; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"iiot {__version__}")
        return 0
    try:
        settings = load_settings()
        _configure_logging(settings.log_level)
        _COMMANDS[args.command](settings, args)
    except IIoTError as exc:
        print(f"iiot: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
