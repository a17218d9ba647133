"""OPC UA certificates: the server's own (generated on first start) and the client trust folder.

Layout under `{data dir}/pki/`: `own/cert.der` + `own/key.pem` (the server's), `trusted/`
(client certificates an administrator accepted, DER or PEM, read on every connection) and
`rejected/` (unknown client certificates, copied there so they can be moved to `trusted/`).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import logging
import os
import socket
from pathlib import Path
from typing import Any

from asyncua import ua as _ua
from asyncua.common.utils import ServiceError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["APPLICATION_URI", "Pki", "write_self_signed"]

# asyncua's `ua` types are generated NewTypes that mypy cannot follow; treat them as Any.
ua: Any = _ua

log = logging.getLogger(__name__)

# Rejected client certificates kept (the newest); older ones are deleted.
MAX_REJECTED = 100

# The server's ApplicationUri; it must also appear in its certificate's subjectAltName.
APPLICATION_URI = "urn:iiot:platform:server"

# A client certificate larger than this is not a certificate; refuse to store it.
_MAX_CERT_FILE_BYTES = 64 * 1024


class Pki:
    """The `pki/` folder: own certificate, trusted and rejected client certificates."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.own = root / "own"
        self.trusted = root / "trusted"
        self.rejected = root / "rejected"
        self.cert_path = self.own / "cert.der"
        self.key_path = self.own / "key.pem"

    def ensure_server_certificate(self, hostnames: list[str] | None = None) -> bool:
        """Create the folders and, on first start, a self-signed server certificate.

        Returns whether a new certificate was generated.
        """
        for folder in (self.own, self.trusted, self.rejected):
            folder.mkdir(parents=True, exist_ok=True)
        if self.cert_path.exists() and self.key_path.exists():
            return False
        write_self_signed(
            self.cert_path,
            self.key_path,
            "IIoT platform OPC UA server",
            APPLICATION_URI,
            hostnames or _default_hostnames(),
        )
        log.warning("OPC UA: generated server certificate %s", self.cert_path)
        return True

    def is_trusted(self, der: bytes) -> bool:
        """Whether this client certificate (DER) is in `trusted/` now."""
        wanted = hashlib.sha256(der).digest()
        try:
            entries = list(self.trusted.iterdir())
        except FileNotFoundError:
            return False
        for path in entries:
            if not path.is_file() or path.stat().st_size > _MAX_CERT_FILE_BYTES:
                continue
            candidate = _load_der(path)
            if candidate is not None and hashlib.sha256(candidate).digest() == wanted:
                return True
        return False

    def reject(self, cert: x509.Certificate) -> Path:
        """Copy an unknown client certificate into `rejected/` (named by its thumbprint).

        The folder keeps the newest `MAX_REJECTED` certificates: anyone can offer a new
        self-signed certificate per connection, so without a bound it fills the disk.
        """
        der = cert.public_bytes(serialization.Encoding.DER)
        thumb = hashlib.sha1(der, usedforsecurity=False).hexdigest()  # the OPC UA thumbprint
        path = self.rejected / f"{_safe_name(cert)}[{thumb}].der"
        self.rejected.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            self._make_room(MAX_REJECTED - 1)
            path.write_bytes(der)
        return path

    def _make_room(self, keep: int) -> None:
        """Delete the oldest rejected certificates beyond `keep`."""
        try:
            found = sorted(
                (entry.stat().st_mtime, entry)
                for entry in self.rejected.iterdir()
                if entry.is_file()
            )
        except OSError:
            return
        for _, entry in found[: max(0, len(found) - keep)]:
            with contextlib.suppress(OSError):
                entry.unlink()

    async def validate(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        """asyncua certificate validator: trusted clients pass, others are refused and kept."""
        der = cert.public_bytes(serialization.Encoding.DER)
        if self.is_trusted(der):
            return
        path = self.reject(cert)
        log.warning(
            "OPC UA: refused untrusted client certificate of %r (saved as %s; move it to %s "
            "to trust it)",
            app.ApplicationUri,
            path,
            self.trusted,
        )
        raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)


def _load_der(path: Path) -> bytes | None:
    """A certificate file (DER or PEM) as DER bytes; None when it is not a certificate."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
        return x509.load_der_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    except ValueError:
        log.warning("OPC UA: %s in the trusted folder is not a certificate; ignored", path)
        return None


def _safe_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(attrs[0].value) if attrs else "client"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64] or "client"


def _default_hostnames() -> list[str]:
    names = ["localhost", socket.gethostname()]
    with contextlib.suppress(OSError):
        names.append(socket.getfqdn())
    return list(dict.fromkeys(n for n in names if n))


def write_self_signed(
    cert_path: Path, key_path: Path, common_name: str, application_uri: str, hostnames: list[str]
) -> None:
    """Write a new self-signed OPC UA application certificate (DER) and its key (PEM, 0600)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = _self_signed(key, common_name, application_uri, hostnames)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))


def _self_signed(
    key: rsa.RSAPrivateKey, common_name: str, application_uri: str, hostnames: list[str]
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "IIoT platform"),
        ]
    )
    alt: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    alt += [x509.DNSName(h) for h in hostnames]
    alt.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
