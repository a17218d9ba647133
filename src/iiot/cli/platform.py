"""`iiot run`, `migrate`, `version`, `backup`, `restore`: the platform and its database."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iiot.cli.common import require_database, with_store
from iiot.config import Settings
from iiot.errors import InvalidRequest
from iiot.runtime import tune_garbage_collector
from iiot.storage.base import Store

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the platform commands to the top-level parser."""
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
    run.set_defaults(handler=_cmd_run)

    migrate = sub.add_parser(
        "migrate",
        help="bring the database schema up to date",
        description="Bring the database schema up to date.",
    )
    migrate.set_defaults(handler=_cmd_migrate)
    sub.add_parser("version", help="print the version", description="Print the version.")

    backup = sub.add_parser(
        "backup",
        help="write a consistent backup of the database to a file",
        description="Write a consistent backup of the configured database (taken while the "
        "platform runs) to one file with a manifest and checksums (mode 0600).",
    )
    backup.add_argument("path", help="the backup file to write (replaced atomically)")
    backup.set_defaults(handler=_cmd_backup)
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
    restore.set_defaults(handler=_cmd_restore)


def _cmd_migrate(settings: Settings, args: argparse.Namespace) -> None:
    async def action(store: Store) -> None:
        print(f"database schema is up to date ({settings.effective_database_url.split(':')[0]})")

    asyncio.run(with_store(settings, action, create=True))


def _cmd_run(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.app import run_platform

    if args.workers < 1:
        raise InvalidRequest(f"--workers {args.workers}: expected 1 or more")
    if args.workers > 1:
        from iiot.workers import run_workers

        run_workers(settings, args.role, args.workers)
        return
    tune_garbage_collector()
    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        runner.run(run_platform(settings, args.role))


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop of a platform process: uvloop when installed (every role).

    A platform process spends much of its CPU on socket I/O and callbacks, which uvloop
    does in C: a two-way command cost 4.3 ms of the platform's CPU on the default loop and
    3.6 ms on uvloop (figures: docs/performance.md). Without uvloop (Windows) the default
    loop runs the same code.
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _cmd_backup(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.backup import backup

    require_database(settings)
    manifest = asyncio.run(backup(settings.effective_database_url, Path(args.path)))
    print(f"backup written to {args.path}: {manifest.summary()}")


def _cmd_restore(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.backup import restore

    url = settings.effective_database_url
    manifest = asyncio.run(restore(url, Path(args.path), force=args.force))
    print(f"restored {args.path} into {url.split(':')[0]}: {manifest.summary()}")
