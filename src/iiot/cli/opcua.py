"""`iiot opcua ...`: OPC UA first contact (client certificates, trust)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from iiot.cli.common import require_database
from iiot.cli.output import add_json_flag, print_rows
from iiot.config import Settings

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add `iiot opcua` to the top-level parser."""
    opcua = sub.add_parser(
        "opcua",
        help="OPC UA client certificates",
        description="Make, list and trust OPC UA client certificates (in the data "
        "directory's pki/ folder; the server reads it on every new session).",
    )
    opcua_sub = opcua.add_subparsers(dest="action", required=True, metavar="ACTION")
    client_cert = opcua_sub.add_parser(
        "client-cert",
        help="write a client certificate and key, and trust it",
        description="Write NAME.der (certificate) and NAME.key.pem (key, mode 0600) for an "
        "OPC UA client such as asyncua's uals/uaread, and add the certificate to the "
        "server's trusted folder.",
    )
    client_cert.add_argument("name", help="the certificate's name (its common name)")
    client_cert.add_argument(
        "--dir", default=".", help="where to write the two files (default: here)"
    )
    client_cert.add_argument(
        "--application-uri",
        help="the client's ApplicationUri (default urn:iiot:client:NAME; asyncua's tools "
        "use urn:example.org:FreeOpcUa:opcua-asyncio)",
    )
    client_cert.add_argument("--force", action="store_true", help="replace existing files")
    client_cert.set_defaults(handler=_cmd_client_cert)

    certs = opcua_sub.add_parser(
        "certs",
        help="list the server's, trusted and rejected certificates",
        description="List the server's own certificate and the trusted and rejected client "
        "certificates, with their thumbprints.",
    )
    add_json_flag(certs)
    certs.set_defaults(handler=_cmd_certs)

    trust = opcua_sub.add_parser(
        "trust",
        help="trust a client certificate (a file, or a rejected one by thumbprint)",
        description="Trust a client certificate: a certificate file (DER or PEM), or a "
        "rejected one named by its thumbprint (or its first digits, see `iiot opcua certs`).",
    )
    trust.add_argument("certificate", metavar="FILE|THUMBPRINT")
    trust.set_defaults(handler=_cmd_trust)


def _pki(settings: Settings) -> Any:
    from iiot.adapters.opcua_pki import Pki

    require_database(settings)  # the data directory `iiot run` uses, not a new one
    return Pki(settings.data_dir / "pki")


def _cmd_client_cert(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.opcua_certs import make_client_certificate, thumbprint

    cert, key, trusted = make_client_certificate(
        _pki(settings), args.name, Path(args.dir), args.application_uri, args.force
    )
    print(f"certificate {cert}")
    print(f"key         {key} (mode 0600)")
    print(f"trusted as  {trusted} (thumbprint {thumbprint(cert.read_bytes())})")
    print(f"use: --security=Basic256Sha256,SignAndEncrypt,{cert},{key}")


def _cmd_certs(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.opcua_certs import list_certificates

    rows = [
        {
            "state": c.state,
            "name": c.name,
            "thumbprint": c.thumbprint,
            "valid_until": c.valid_until,
            "application_uri": c.application_uri,
            "file": str(c.path),
        }
        for c in list_certificates(_pki(settings))
    ]
    columns = ("state", "name", "thumbprint", "valid_until", "file")
    print_rows(rows, columns, args.json)


def _cmd_trust(settings: Settings, args: argparse.Namespace) -> None:
    from iiot.opcua_certs import trust

    info, target = trust(_pki(settings), args.certificate)
    print(f"trusted {info.name or '(no name)'} (thumbprint {info.thumbprint}) as {target}")
