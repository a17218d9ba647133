"""Command line: `iiot run`, `iiot migrate`, and commands to manage tenants, users, devices.

One module per command group; each has `register(sub)`, which adds its parsers and sets
`handler` on them. A new group is a new module plus one line in `_GROUPS`. Commands are
thin: they build settings, then call the app or the store. Every error is one clear line on
stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from iiot import __version__
from iiot.cli import devices, mosquitto, opcua, platform, tenants, users
from iiot.config import load_settings
from iiot.errors import IIoTError

__all__ = ["main"]

log = logging.getLogger("iiot")

# Command groups in the order `iiot --help` lists them.
_GROUPS = (platform, tenants, users, devices, opcua, mosquitto)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Third-party libraries are chatty at INFO; their warnings still show.
    for name in ("asyncua", "aiocoap", "aio_pika", "aiormq", "uvicorn", "transitions"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iiot", description="Industrial IoT platform. Settings come from IIOT_* variables."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in _GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `iiot` command; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"iiot {__version__}")
        return 0
    try:
        settings = load_settings()
        _configure_logging(settings.log_level)
        args.handler(settings, args)
    except IIoTError as exc:
        print(f"iiot: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # an error nobody foresaw is still one line, not a traceback
        log.debug("command failed", exc_info=True)  # IIOT_LOG_LEVEL=DEBUG shows where
        print(f"iiot: error: {_describe(exc)}", file=sys.stderr)
        return 1
    return 0


def _describe(exc: BaseException) -> str:
    """One line saying what went wrong, for an unexpected exception."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return _one_line(f"{exc.strerror}{where}")
    text = str(exc)
    return _one_line(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def _one_line(text: str) -> str:
    return " ".join(text.split())
