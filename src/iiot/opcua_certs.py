"""OPC UA certificates for administrators: make a client certificate, list and trust them.

Works on the `pki/` folder of the data directory that the OPC UA server reads on every new
session (see `adapters/opcua_pki.py`), so a change takes effect without a restart.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from iiot.adapters.opcua_pki import Pki, write_self_signed
from iiot.errors import Conflict, InvalidRequest, NotFound

__all__ = ["CertInfo", "list_certificates", "make_client_certificate", "trust"]

_MAX_CERT_FILE_BYTES = 64 * 1024
_MIN_THUMBPRINT_CHARS = 6


@dataclass(frozen=True, slots=True)
class CertInfo:
    """One certificate file of the pki folder."""

    state: str  # own, trusted or rejected
    name: str  # the subject's common name
    thumbprint: str  # SHA-1 of the DER form, hex (as OPC UA tools show it)
    valid_until: str
    application_uri: str | None
    path: Path


def _der(path: Path) -> bytes | None:
    """A certificate file (DER or PEM) as DER; None when it is not one."""
    try:
        if path.stat().st_size > _MAX_CERT_FILE_BYTES:
            return None
        data = path.read_bytes()
        if b"-----BEGIN CERTIFICATE-----" in data:
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
    except (OSError, ValueError):
        return None
    return cert.public_bytes(serialization.Encoding.DER)


def thumbprint(der: bytes) -> str:
    """The OPC UA thumbprint of a certificate: SHA-1 of its DER form, lower-case hex."""
    return hashlib.sha1(der, usedforsecurity=False).hexdigest()


def _info(state: str, path: Path, der: bytes) -> CertInfo:
    cert = x509.load_der_x509_certificate(der)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    return CertInfo(
        state=state,
        name=str(names[0].value) if names else "",
        thumbprint=thumbprint(der),
        valid_until=cert.not_valid_after_utc.strftime("%Y-%m-%d"),
        application_uri=uris[0] if uris else None,
        path=path,
    )


def list_certificates(pki: Pki) -> list[CertInfo]:
    """The server's own certificate, then trusted and rejected client certificates."""
    found: list[CertInfo] = []
    own = _der(pki.cert_path)
    if own is not None:
        found.append(_info("own", pki.cert_path, own))
    for state, folder in (("trusted", pki.trusted), ("rejected", pki.rejected)):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            der = _der(path) if path.is_file() else None
            if der is not None:
                found.append(_info(state, path, der))
    return found


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:64] or "client"


def make_client_certificate(
    pki: Pki, name: str, folder: Path, application_uri: str | None = None, force: bool = False
) -> tuple[Path, Path, Path]:
    """Write a client certificate (DER) and key (PEM, 0600) into `folder` and trust it.

    Returns (certificate, key, trusted copy).
    """
    if _safe(name) != name:
        raise InvalidRequest(f"{name!r}: use letters, digits, '-', '_' and '.' only")
    cert_path, key_path = folder / f"{name}.der", folder / f"{name}.key.pem"
    for path in (cert_path, key_path):
        if path.exists() and not force:
            raise Conflict(f"{path} exists; choose another name or add --force to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    hostnames = list(dict.fromkeys(["localhost", socket.gethostname()]))
    write_self_signed(
        cert_path, key_path, name, application_uri or f"urn:iiot:client:{name}", hostnames
    )
    der = cert_path.read_bytes()
    return cert_path, key_path, _copy_trusted(pki, name, der)


def _copy_trusted(pki: Pki, name: str, der: bytes) -> Path:
    pki.trusted.mkdir(parents=True, exist_ok=True)
    target = pki.trusted / f"{_safe(name)}[{thumbprint(der)}].der"
    target.write_bytes(der)
    return target


def trust(pki: Pki, ref: str) -> tuple[CertInfo, Path]:
    """Trust a certificate file, or a rejected certificate given by (a prefix of) its thumbprint.

    Returns the certificate and where it now is in `trusted/`.
    """
    path = Path(ref)
    if path.is_file():
        der = _der(path)
        if der is None:
            raise InvalidRequest(f"{ref} is not a certificate (DER or PEM)")
        info = _info("trusted", path, der)
        target = _copy_trusted(pki, info.name or path.stem, der)
        if path.parent.resolve() == pki.rejected.resolve():
            path.unlink()
        return info, target
    wanted = ref.lower().replace(":", "")
    if len(wanted) < _MIN_THUMBPRINT_CHARS or any(c not in "0123456789abcdef" for c in wanted):
        raise NotFound(
            f"{ref!r} is neither a file nor a thumbprint (at least {_MIN_THUMBPRINT_CHARS} hex "
            "digits; `iiot opcua certs` lists them)"
        )
    matches = [
        c for c in list_certificates(pki) if c.state != "own" and c.thumbprint.startswith(wanted)
    ]
    if not matches:
        raise NotFound(f"no trusted or rejected certificate has a thumbprint starting {wanted}")
    if len({c.thumbprint for c in matches}) > 1:
        raise InvalidRequest(f"several certificates have a thumbprint starting {wanted}")
    chosen = matches[0]
    trusted = [c for c in matches if c.state == "trusted"]
    if trusted:
        return trusted[0], trusted[0].path
    target = pki.trusted / chosen.path.name
    pki.trusted.mkdir(parents=True, exist_ok=True)
    shutil.move(chosen.path, target)
    return chosen, target
