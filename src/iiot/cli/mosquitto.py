"""`iiot mosquitto acl`: files that make an external Mosquitto enforce the platform's rules."""

from __future__ import annotations

import argparse
from typing import Any

from iiot.config import Settings

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add `iiot mosquitto` to the top-level parser."""
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
    mosquitto_acl.set_defaults(handler=_cmd_acl)


def _cmd_acl(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.adapters.mosquitto_security import acl_file

    print(acl_file(args.platform_user), end="")
