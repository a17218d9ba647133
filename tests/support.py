"""Test support: real services (skip or fail when absent), free ports, the running platform."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from iiot.app import Platform
from iiot.config import load_settings


def services_required() -> bool:
    """Whether a missing service must fail the test run rather than skip."""
    return os.environ.get("IIOT_REQUIRE_SERVICES", "") == "1"


def need_service(name: str, host: str, port: int) -> None:
    """Skip (or fail, when services are required) if nothing listens at host:port."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as exc:
        message = f"{name} is not reachable at {host}:{port}: {exc}"
        if services_required():
            pytest.fail(message)
        pytest.skip(message)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that nothing on this machine listens on right now."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


ADMIN_PASSWORD = "admin-password-for-tests"

# Every protocol off unless the test turns it on: tests only open the ports they use.
_OFF = {
    "IIOT_HTTP_PORT": "0",
    "IIOT_MQTT_PORT": "0",
    "IIOT_COAP_PORT": "0",
    "IIOT_OPCUA_PORT": "0",
}


def platform_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    """Environment for a test platform: SQLite in `data_dir`, fast bcrypt, protocols off.

    Pass e.g. `IIOT_HTTP_PORT=str(free_port())` to turn a protocol on.
    """
    env = {
        **_OFF,
        "IIOT_DATA_DIR": str(data_dir),
        "IIOT_ADMIN_USERNAME": "admin",
        "IIOT_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "IIOT_BCRYPT_ROUNDS": "4",
        "IIOT_BIND_HOST": "127.0.0.1",
        "IIOT_LOG_LEVEL": "WARNING",
    }
    env.update(overrides)
    return env


@contextlib.asynccontextmanager
async def running_platform(env: Mapping[str, str]) -> AsyncIterator[Platform]:
    """The platform running inside the test's event loop."""
    async with Platform(load_settings(env)) as platform:
        yield platform


@contextlib.asynccontextmanager
async def temporary_pg_database(admin_url: str, prefix: str = "iiot_test") -> AsyncIterator[str]:
    """A new empty database on the server of `admin_url` (its URL), dropped afterwards."""
    import asyncpg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield urlunsplit(urlsplit(admin_url)._replace(path="/" + name))
    finally:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def wait_for_port(host: str, port: int, timeout_s: float = 30.0) -> None:
    """Block until something accepts TCP connections at host:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")


@contextlib.contextmanager
def platform_process(env: Mapping[str, str], *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m iiot run` as a child process; ready once its HTTP port answers.

    The environment must set IIOT_HTTP_PORT to a real port (it is used to wait for start).
    """
    full_env = {**os.environ, **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "iiot", "run", *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port("127.0.0.1", int(env["IIOT_HTTP_PORT"]))
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


__all__ = [
    "ADMIN_PASSWORD",
    "free_port",
    "need_service",
    "platform_env",
    "platform_process",
    "running_platform",
    "services_required",
    "temporary_pg_database",
    "wait_for_port",
]


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for localhost / 127.0.0.1: (cert, key) files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "fullchain.pem", folder / "privkey.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path
