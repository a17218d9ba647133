"""REST API load test: 100 concurrent users through nginx against >= 10 million stored points.

What it does, all on loopback and bounded in time:
1. creates a throwaway PostgreSQL database `iiot_bench_api_<pid>`; tenants, users and devices
   are made through the platform's own Store and DeviceRegistry (so password and token hashes
   are real), then the telemetry is generated inside PostgreSQL (`INSERT ... SELECT` from
   `generate_series`, primary key built once afterwards: far faster than row-by-row writes);
2. starts `python -m iiot run --role api` and nginx in front of it (TLS, self-signed cert);
3. checks each request of the mix once by hand, then drives it with `wrk` (bench/wrk/mix.lua):
   login (rare: bcrypt is deliberately slow), device listing, latest values, 24-hour history;
4. runs the same wrk against `/healthz` (the server doing no work) as the baseline;
5. stops everything and drops the database (`--keep-db NAME`: seeds into NAME and keeps it,
   and a later run with the same data parameters reuses it instead of seeding again).

Target (issue 6): 100 x the original 1,000 requests/minute = 1,667 req/s with p99 < 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import asyncpg
import httpx

from iiot.bus import LiveBus
from iiot.model import Device, DevicePoints, Point, Role
from iiot.registry import DeviceRegistry
from iiot.security import hash_password
from iiot.storage import open_store

__all__ = ["main", "run"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MIX_SCRIPT = HERE / "wrk" / "mix.lua"
NGINX_TEMPLATE = REPO / "deploy" / "nginx" / "iiot.conf"

ADMIN_URL = os.environ.get("IIOT_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
KEYS = ("temperature", "pressure", "humidity", "vibration")
TARGET_RPS = 100 * 1000 / 60  # 100 x the original requirement of 1,000 requests per minute
TARGET_P99_MS = 200.0
PASSWORD = "bench-password-1"
# The production default: login cost is part of what users see.
BCRYPT_ROUNDS = 12


@dataclass(frozen=True, slots=True)
class Params:
    """The knobs of one run."""

    devices: int = 1000
    tenants: int = 10
    points_per_series: int = 2500  # 1000 devices x 4 keys x 2500 = 10 million points
    step_ms: int = 36_000  # one point per key every 36 s: 2500 points span 25 hours
    connections: int = 100  # concurrent users
    threads: int = 2
    duration_s: int = 30
    baseline_duration_s: int = 10
    workers: int = 2

    @property
    def points(self) -> int:
        """How many telemetry points are stored."""
        return self.devices * len(KEYS) * self.points_per_series


FULL = Params()
QUICK = Params(
    devices=200, points_per_series=1250, step_ms=72_000, duration_s=8, baseline_duration_s=4
)


@dataclass(slots=True)
class Tenancy:
    """One tenant of the fixture: the user who logs in and the tenant's devices."""

    username: str
    device_ids: list[UUID] = field(default_factory=list)
    token: str = ""  # a JWT, fetched before the load starts


# --- database ---------------------------------------------------------------------------


def _db_url(name: str) -> str:
    parts = urlsplit(ADMIN_URL)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _create_database(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _seed_objects(url: str, params: Params) -> tuple[list[Tenancy], list[Device]]:
    """Tenants, one tenant_user each and their devices, through the platform's Store API."""
    # One hash for every user: bcrypt at production cost is slow on purpose (~0.25 s each).
    password_hash = await asyncio.to_thread(hash_password, PASSWORD, BCRYPT_ROUNDS)
    tenancies: list[Tenancy] = []
    devices: list[Device] = []
    async with open_store(url) as store:  # also applies the schema migrations
        await store.create_user(None, "admin", password_hash, Role.SYSADMIN)
        registry = DeviceRegistry(store, LiveBus())
        per_tenant = params.devices // params.tenants
        for t in range(params.tenants):
            tenant = await store.create_tenant(f"plant-{t:02d}")
            user = await store.create_user(
                tenant.id, f"operator-{t:02d}", password_hash, Role.TENANT_USER
            )
            tenancy = Tenancy(user.username)
            for d in range(per_tenant):
                device, _token = await registry.create_device(tenant.id, f"machine-{d:04d}")
                tenancy.device_ids.append(device.id)
                devices.append(device)
            tenancies.append(tenancy)
    return tenancies, devices


def _value_sql(i: str) -> str:
    """A smooth, slightly noisy sensor value for point number `i` (0 = newest)."""
    return f"round((20 + 10 * sin({i} / 40.0) + random())::numeric, 2)::double precision"


async def _fill(url: str, device_ids: list[UUID], params: Params, end_ms: int) -> None:
    """Every point but the newest of each series, generated by PostgreSQL itself."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET synchronous_commit = off")
        await conn.execute(
            f"""
            INSERT INTO telemetry (device_id, key, ts, num_value)
            SELECT d.id, k.key, $3::bigint - s.i * $4::bigint, {_value_sql("s.i")}
            FROM unnest($1::uuid[]) AS d(id)
            CROSS JOIN unnest($2::text[]) AS k(key)
            CROSS JOIN generate_series(1, $5::int - 1) AS s(i)
            """,
            device_ids,
            list(KEYS),
            end_ms,
            params.step_ms,
            params.points_per_series,
        )
    finally:
        await conn.close()


async def _seed_telemetry(url: str, devices: list[Device], params: Params, end_ms: int) -> None:
    """Bulk-load the history without the primary key, build it once, then write the newest
    point of each series through `Store.write_points`, which keeps whatever the store derives
    from new points (key lists, latest values) as it does in production.
    """
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT conname, pg_get_constraintdef(oid) AS definition FROM pg_constraint"
            " WHERE conrelid = 'telemetry'::regclass AND contype = 'p'"
        )
        if row is not None:
            await conn.execute(f'ALTER TABLE telemetry DROP CONSTRAINT "{row["conname"]}"')
        # Two loaders in parallel: one per core.
        ids = [d.id for d in devices]
        half = len(ids) // 2
        await asyncio.gather(
            _fill(url, ids[:half], params, end_ms), _fill(url, ids[half:], params, end_ms)
        )
        if row is not None:
            await conn.execute("SET maintenance_work_mem = '1GB'")
            await conn.execute(
                f'ALTER TABLE telemetry ADD CONSTRAINT "{row["conname"]}" {row["definition"]}'
            )
        async with open_store(url) as store:
            batch = [
                DevicePoints(device, tuple(Point(key, end_ms, 20.0) for key in KEYS))
                for device in devices
            ]
            for first in range(0, len(batch), 250):
                await store.write_points(batch[first : first + 250])
        # Sets hint bits, the visibility map and planner statistics now, not while measuring.
        await conn.execute("VACUUM (ANALYZE)")
    finally:
        await conn.close()


async def _seed(db_name: str, params: Params, end_ms: int) -> tuple[list[Tenancy], float]:
    """A fresh database holding the fixture; returns it and the seconds it took."""
    started = time.perf_counter()
    await _create_database(db_name)
    url = _db_url(db_name)
    tenancies, devices = await _seed_objects(url, params)
    await _seed_telemetry(url, devices, params, end_ms)
    return tenancies, time.perf_counter() - started


# --keep-db: the fixture's shape and end time are recorded in the kept database, so a later
# run with the same data parameters reuses it (queries use the recorded window).
_FIXTURE_DDL = "CREATE TABLE bench_fixture (shape text NOT NULL, end_ms bigint NOT NULL)"


def _shape(params: Params) -> str:
    return f"{params.devices}/{params.tenants}/{params.points_per_series}/{params.step_ms}"


async def _load_kept(db_name: str, params: Params) -> tuple[list[Tenancy], int] | None:
    """The fixture of a kept database seeded with the same data parameters, else None."""
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", db_name)
    finally:
        await admin.close()
    if not exists:
        return None
    conn = await asyncpg.connect(_db_url(db_name))
    try:
        if await conn.fetchval("SELECT to_regclass('bench_fixture')") is None:
            return None
        row = await conn.fetchrow("SELECT shape, end_ms FROM bench_fixture")
        if row is None or row["shape"] != _shape(params):
            return None
        rows = await conn.fetch(
            "SELECT u.username, d.id FROM users u JOIN devices d ON d.tenant_id = u.tenant_id"
            " WHERE u.role = 'tenant_user' ORDER BY u.username, d.name"
        )
    finally:
        await conn.close()
    by_user: dict[str, Tenancy] = {}
    for r in rows:
        by_user.setdefault(r["username"], Tenancy(r["username"])).device_ids.append(r["id"])
    return list(by_user.values()), int(row["end_ms"])


async def _record_kept(db_name: str, params: Params, end_ms: int) -> None:
    conn = await asyncpg.connect(_db_url(db_name))
    try:
        await conn.execute(_FIXTURE_DDL)
        await conn.execute("INSERT INTO bench_fixture VALUES ($1, $2)", _shape(params), end_ms)
    finally:
        await conn.close()


# --- processes: the platform and nginx --------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """Block until `url` answers 200; fail early (with the log's tail) if the process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}: {_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1, verify=False).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s: {_tail(log)}")


def _tail(log: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(log.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


@contextlib.contextmanager
def _process(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process, stopped (SIGTERM, then SIGKILL) when the block ends."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            # Its own session: the signal reaches the workers it started, and only them.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), to count the API's worker processes."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _platform_env(db_name: str, port: int, data_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "IIOT_DATABASE_URL": _db_url(db_name),
        "IIOT_DATA_DIR": str(data_dir),
        "IIOT_BIND_HOST": "127.0.0.1",
        "IIOT_HTTP_PORT": str(port),
        "IIOT_MQTT_PORT": "0",
        "IIOT_COAP_PORT": "0",
        "IIOT_OPCUA_PORT": "0",
        "IIOT_ADMIN_PASSWORD": PASSWORD,
        "IIOT_LOG_LEVEL": "WARNING",
    }


def _self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1, valid for one day."""
    from datetime import UTC, datetime, timedelta
    from ipaddress import IPv4Address

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "bench.crt", directory / "bench.key"
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


# Used while deploy/nginx/iiot.conf does not exist: the same shape as a production proxy
# (TLS termination, HTTP/1.1 keep-alive to the upstream, forwarded headers).
_OWN_NGINX_CONF = """
worker_processes auto;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream iiot {{
{servers}
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{listen_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://iiot;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""


# The main context around deploy/nginx/iiot.conf, which is meant to be included in `http`.
_MAIN_NGINX_CONF = """
worker_processes auto;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {site};
}}
"""


def _render_deploy_conf(
    template: str,
    tmp: Path,
    ports: tuple[int, int],
    upstream_ports: list[int],
    cert: Path,
    key: Path,
) -> str:
    """deploy/nginx/iiot.conf made to run here: loopback ports, the throwaway certificate,
    logs in the temp dir, and the login rate limit per address raised (see below).
    Raises ValueError when the file no longer has the lines this relies on.
    """
    https_port, http_port = ports
    servers = "\n".join(f"    server 127.0.0.1:{p};" for p in upstream_ports)
    rules: list[tuple[str, str]] = [
        (r"^\s*server 127\.0\.0\.1:\d+;\s*$", servers),
        (r"^(\s*)listen \[::\]:\d+[^;]*;\s*$", ""),  # loopback IPv4 only
        (r"^(\s*)listen 80;", rf"\g<1>listen 127.0.0.1:{http_port};"),
        (r"^(\s*)listen 443 ", rf"\g<1>listen 127.0.0.1:{https_port} "),
        (r"^(\s*)ssl_certificate\s+\S+;", rf"\g<1>ssl_certificate {cert};"),
        (r"^(\s*)ssl_certificate_key\s+\S+;", rf"\g<1>ssl_certificate_key {key};"),
        (r"(access_log\s+)/var/log/nginx/[^\s;]+", rf"\g<1>{tmp}/access.log"),
        (r"(error_log\s+)/var/log/nginx/[^\s;]+", rf"\g<1>{tmp}/error.log"),
        # All 100 simulated users come from 127.0.0.1: the production limit of 10 logins a
        # minute per address would refuse most of their logins. Raised for the bench only.
        (r"(zone=iiot_login:\S+\s+rate=)\d+r/m", r"\g<1>60000r/m"),
    ]
    text = template
    for pattern, replacement in rules:
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        if count == 0 and "listen \\[" not in pattern:
            raise ValueError(f"deploy/nginx/iiot.conf: no line matches {pattern!r}")
    return text


def _nginx_conf(tmp: Path, listen_port: int, upstream_ports: list[int]) -> tuple[Path, str]:
    """The nginx configuration to use and where it came from.

    deploy/nginx/iiot.conf when it exists and can be adapted, else a minimal config of the
    same shape (TLS termination, keep-alive to the upstream, forwarded headers).
    """
    cert, key = _self_signed_cert(tmp)
    conf = tmp / "nginx.conf"
    source = "bench_api's own minimal config (deploy/nginx/iiot.conf not found)"
    if NGINX_TEMPLATE.exists():
        try:
            site = _render_deploy_conf(
                NGINX_TEMPLATE.read_text(),
                tmp,
                (listen_port, _free_port()),
                upstream_ports,
                cert,
                key,
            )
        except ValueError as exc:
            source = f"bench_api's own minimal config ({exc})"
        else:
            (tmp / "iiot.conf").write_text(site)
            conf.write_text(_MAIN_NGINX_CONF.format(tmp=tmp, site=tmp / "iiot.conf"))
            return conf, (
                "deploy/nginx/iiot.conf (ports, certificate and log paths adapted; "
                "login limit per address raised: every user is on 127.0.0.1)"
            )
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in upstream_ports)
    text = _OWN_NGINX_CONF.format(
        tmp=tmp, servers=servers, listen_port=listen_port, cert=cert, key=key
    )
    conf.write_text(text)
    return conf, source


# --- load --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run, as its `done()` hook reported it."""

    requests: int
    duration_s: float
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    bytes: int

    @property
    def rps(self) -> float:
        """Completed requests per second."""
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def error_count(self) -> int:
        """Socket errors, timeouts and non-2xx/3xx answers."""
        return sum(self.errors.values())


def _run_wrk(url: str, data_file: Path, mode: str, params: Params, duration_s: int) -> WrkResult:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed: apt-get install -y wrk")
    args = [
        wrk,
        f"-t{params.threads}",
        f"-c{params.connections}",
        f"-d{duration_s}s",
        "--timeout",
        "10s",
        "-s",
        str(MIX_SCRIPT),
        url,
        "--",
        str(data_file),
        mode,
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=duration_s + 60)
    match = re.search(r"^WRK_RESULT (\{.*\})$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-800:]} {done.stderr}")
    raw = json.loads(match.group(1))
    lat = raw["latency_us"]
    return WrkResult(
        requests=raw["requests"],
        duration_s=raw["duration_us"] / 1e6,
        errors=raw["errors"],
        p50_ms=lat["p50"] / 1000,
        p90_ms=lat["p90"] / 1000,
        p99_ms=lat["p99"] / 1000,
        p999_ms=lat["p999"] / 1000,
        max_ms=lat["max"] / 1000,
        mean_ms=lat["mean"] / 1000,
        bytes=raw["bytes"],
    )


# Shares of the mix: login (bcrypt at cost 12, about 0.25 s of CPU each), device list,
# latest values, 24-hour history as a chart (5-minute averages) and as raw points.
MIX = {"login": 0.001, "list": 0.15, "latest": 0.45, "history_agg": 0.30, "history_raw": 0.099}


def _write_data_file(path: Path, tenancies: list[Tenancy], start_ms: int, end_ms: int) -> None:
    lines = [
        "share " + " ".join(str(MIX[k]) for k in MIX),
        f"window {start_ms} {end_ms}",
    ]
    for tenancy in tenancies:
        lines.append(f"tenant {tenancy.username} {PASSWORD} {tenancy.token}")
    for index, tenancy in enumerate(tenancies, start=1):
        lines.extend(f"device {index} {device_id}" for device_id in tenancy.device_ids)
    path.write_text("\n".join(lines) + "\n")


def _login_and_check(
    base: str, tenancies: list[Tenancy], start_ms: int, end_ms: int, expected_raw: int
) -> dict[str, int]:
    """Log every tenant user in, then send each request of the mix once and check its answer.

    Returns the size in bytes of each kind of answer. A wrong answer stops the benchmark:
    a fast error is not a result.
    """
    sizes: dict[str, int] = {}
    with httpx.Client(base_url=base, verify=False, timeout=30) as client:
        for tenancy in tenancies:
            answer = client.post(
                "/api/auth/login", json={"username": tenancy.username, "password": PASSWORD}
            )
            _expect(answer, "login")
            tenancy.token = answer.json()["access_token"]
            sizes["login"] = len(answer.content)
        tenancy = tenancies[0]
        headers = {"Authorization": f"Bearer {tenancy.token}"}
        device = tenancy.device_ids[0]
        listing = client.get("/api/devices?limit=20&offset=0", headers=headers)
        _expect(listing, "device list")
        if listing.json()["total"] != len(tenancy.device_ids):
            raise RuntimeError(f"device list: unexpected total in {listing.text[:200]}")
        sizes["list"] = len(listing.content)
        latest = client.get(f"/api/devices/{device}/telemetry/latest", headers=headers)
        _expect(latest, "latest values")
        if set(latest.json()) != set(KEYS):
            raise RuntimeError(f"latest values: unexpected keys in {latest.text[:200]}")
        sizes["latest"] = len(latest.content)
        window = f"start={start_ms}&end={end_ms}"
        agg = client.get(
            f"/api/devices/{device}/telemetry?keys=temperature&{window}&agg=avg&interval=5m",
            headers=headers,
        )
        _expect(agg, "24 h history (5-minute averages)")
        if not 280 <= len(agg.json().get("temperature", [])) <= 290:
            raise RuntimeError(f"24 h averages: unexpected answer {agg.text[:200]}")
        sizes["history_agg"] = len(agg.content)
        raw = client.get(
            f"/api/devices/{device}/telemetry?keys=pressure&{window}&limit=10000",
            headers=headers,
        )
        _expect(raw, "24 h history (raw)")
        if len(raw.json().get("pressure", [])) != expected_raw:
            raise RuntimeError(f"24 h raw history: too few points in {raw.text[:200]}")
        sizes["history_raw"] = len(raw.content)
        _expect(client.get("/healthz"), "healthz")
    return sizes


def _expect(answer: httpx.Response, what: str) -> None:
    if answer.status_code != 200:
        raise RuntimeError(f"{what}: HTTP {answer.status_code} {answer.text[:300]}")


def _cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


# --- the benchmark ----------------------------------------------------------------------


def _start_api(
    stack: contextlib.ExitStack, tmp: Path, db_name: str, params: Params
) -> tuple[list[int], str]:
    """Start `iiot run --role api`; returns the upstream ports and how the API runs.

    With `--workers N` implemented, one command serves every worker. If the command still
    runs a single process, N instances on N ports are started instead, so nginx spreads the
    load over N processes in both cases (what an operator would do).
    """
    port = _free_port()
    log = tmp / "api-0.log"
    command = [sys.executable, "-m", "iiot", "run", "--role", "api"]
    proc = stack.enter_context(
        _process(
            [*command, "--workers", str(params.workers)],
            log,
            _platform_env(db_name, port, tmp / "data"),
        )
    )
    _wait_http(f"http://127.0.0.1:{port}/readyz", proc, log, timeout_s=60)
    # The first worker answers alone; the others follow once it listens.
    deadline = time.monotonic() + 15
    workers = 0
    while time.monotonic() < deadline:
        workers = len([p for p in _descendants(proc.pid) if _is_python(p)])
        if workers >= params.workers:
            break
        time.sleep(0.2)
    if workers >= params.workers:
        return [port], f"1 x `iiot run --role api --workers {params.workers}` ({workers} workers)"
    ports = [port]
    for index in range(1, params.workers):
        extra_port = _free_port()
        extra_log = tmp / f"api-{index}.log"
        extra = stack.enter_context(
            _process(command, extra_log, _platform_env(db_name, extra_port, tmp / "data"))
        )
        _wait_http(f"http://127.0.0.1:{extra_port}/readyz", extra, extra_log, timeout_s=60)
        ports.append(extra_port)
    return ports, (
        f"{params.workers} x `iiot run --role api` on {params.workers} ports "
        f"(`--workers` ran {workers + 1} process)"
    )


def _is_python(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return "python" in Path(f"/proc/{pid}/comm").read_text()
    return False


def _load_test(params: Params, progress: bool, keep_db: str | None = None) -> dict[str, Any]:
    db_name = keep_db or f"iiot_bench_api_{os.getpid()}"
    end_ms = time.time_ns() // 1_000_000

    def say(text: str) -> None:
        if progress:
            print(f"[bench_api] {text}", file=sys.stderr, flush=True)

    kept = asyncio.run(_load_kept(db_name, params)) if keep_db else None
    if kept is not None:
        tenancies, end_ms = kept
        seed_s = 0.0
        say(f"reusing the kept database {db_name} ({params.points:,} points)")
    else:
        say(f"seeding {params.points:,} points into {db_name}")
        tenancies, seed_s = asyncio.run(_seed(db_name, params, end_ms))
        if keep_db:
            asyncio.run(_record_kept(db_name, params, end_ms))
    window_end = end_ms + 1
    window_start = window_end - 24 * 3600 * 1000
    try:
        with (
            tempfile.TemporaryDirectory(prefix="iiot-bench-api-") as tmp_name,
            contextlib.ExitStack() as stack,
        ):
            tmp = Path(tmp_name)
            tmp.chmod(0o755)  # nginx workers run as an unprivileged user when started as root
            say("starting the API and nginx")
            ports, api_mode = _start_api(stack, tmp, db_name, params)
            nginx_port = _free_port()
            conf, conf_source = _nginx_conf(tmp, nginx_port, ports)
            nginx_log = tmp / "nginx.log"
            nginx = stack.enter_context(
                _process(["nginx", "-p", str(tmp), "-c", str(conf)], nginx_log)
            )
            base = f"https://127.0.0.1:{nginx_port}"
            _wait_http(f"{base}/healthz", nginx, nginx_log, timeout_s=20)
            say("checking each request of the mix")
            sizes = _login_and_check(
                base, tenancies, window_start, window_end, 24 * 3600 * 1000 // params.step_ms
            )
            data_file = tmp / "wrk-data.txt"
            _write_data_file(data_file, tenancies, window_start, window_end)
            say(f"baseline: /healthz, {params.connections} users, {params.baseline_duration_s} s")
            baseline = _run_wrk(base, data_file, "healthz", params, params.baseline_duration_s)
            say(f"load: the mix, {params.connections} users, {params.duration_s} s")
            busy0, total0 = _cpu_busy()
            mix = _run_wrk(base, data_file, "mix", params, params.duration_s)
            busy1, total1 = _cpu_busy()
            cpu_busy = (busy1 - busy0) / max(1, total1 - total0)
    finally:
        if not keep_db:
            asyncio.run(_drop_database(db_name))
    return _result(params, mix, baseline, sizes, seed_s, api_mode, conf_source, cpu_busy)


def _result(
    params: Params,
    mix: WrkResult,
    baseline: WrkResult,
    sizes: dict[str, int],
    seed_s: float,
    api_mode: str,
    conf_source: str,
    cpu_busy: float,
) -> dict[str, Any]:
    rps_met = mix.rps >= TARGET_RPS
    p99_met = mix.p99_ms < TARGET_P99_MS
    met = rps_met and p99_met and mix.error_count == 0
    users = f"{params.connections} users"

    def figure(label: str, value: float, unit: str, base_label: str, base: float) -> dict[str, Any]:
        return {
            "label": label,
            "value": round(value, 2),
            "unit": unit,
            "baseline_label": base_label,
            "baseline_value": round(base, 2),
            "ratio": round(value / base, 3) if base else None,
            "kind": "throughput" if unit.endswith("/s") else "latency",
        }

    verdict = (
        f"target {TARGET_RPS:,.0f} req/s with p99 < {TARGET_P99_MS:.0f} ms: "
        + ("MET" if met else "NOT MET")
        + f" ({mix.rps:,.0f} req/s, p99 {mix.p99_ms:.1f} ms, {mix.error_count} errors)"
    )
    return {
        "name": "api",
        "figures": [
            figure(f"API mix, {users}", mix.rps, "req/s", f"/healthz, {users}", baseline.rps),
            figure("API mix p50", mix.p50_ms, "ms", "/healthz p50", baseline.p50_ms),
            figure("API mix p99", mix.p99_ms, "ms", "/healthz p99", baseline.p99_ms),
        ],
        "notes": [
            verdict,
            f"{params.points:,} points ({params.devices} devices x {len(KEYS)} keys, "
            f"{params.tenants} tenants), "
            + (f"seeded in {seed_s:.0f} s" if seed_s else "kept database reused (--keep-db)"),
            f"API: {api_mode}; nginx: {conf_source}; TLS, keep-alive",
            f"mix: {', '.join(f'{k} {v:.1%}' for k, v in MIX.items())}",
            f"machine CPU busy during the mix: {cpu_busy:.0%} of {os.cpu_count()} cores "
            "(wrk, nginx, the API and PostgreSQL share them)",
        ],
        "target": {
            "rps": round(TARGET_RPS, 1),
            "p99_ms": TARGET_P99_MS,
            "rps_met": rps_met,
            "p99_met": p99_met,
            "met": met,
        },
        "mix": {
            "requests": mix.requests,
            "rps": round(mix.rps, 1),
            "errors": mix.errors,
            "latency_ms": {
                "p50": mix.p50_ms,
                "p90": mix.p90_ms,
                "p99": mix.p99_ms,
                "p99.9": mix.p999_ms,
                "max": mix.max_ms,
                "mean": round(mix.mean_ms, 2),
            },
            "shares": MIX,
            "answer_bytes": sizes,
        },
        "baseline": {
            "requests": baseline.requests,
            "rps": round(baseline.rps, 1),
            "errors": baseline.errors,
            "latency_ms": {
                "p50": baseline.p50_ms,
                "p90": baseline.p90_ms,
                "p99": baseline.p99_ms,
                "p99.9": baseline.p999_ms,
                "max": baseline.max_ms,
                "mean": round(baseline.mean_ms, 2),
            },
        },
        "params": {
            "points": params.points,
            "devices": params.devices,
            "tenants": params.tenants,
            "connections": params.connections,
            "wrk_threads": params.threads,
            "duration_s": params.duration_s,
            "baseline_duration_s": params.baseline_duration_s,
            "bcrypt_rounds": BCRYPT_ROUNDS,
            "seed_s": round(seed_s, 1),
            "cpu_busy": round(cpu_busy, 3),
        },
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Run the API load test (about 2 minutes; `quick`: fewer points, shorter load)."""
    with _cleanup_on_sigterm():
        return _load_test(QUICK if quick else FULL, progress=True)


@contextlib.contextmanager
def _cleanup_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit, so that a runner stopping this benchmark still gets the
    platform and nginx stopped and the database dropped by the `finally` blocks.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    """Run the load test, print its figures and optionally save them as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer points, shorter load")
    parser.add_argument("--duration", type=int, help="seconds of load (default 30)")
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    parser.add_argument(
        "--keep-db",
        metavar="NAME",
        help="seed into database NAME and keep it; a later run with the same data "
        "parameters reuses it instead of seeding again (drop it yourself when done)",
    )
    args = parser.parse_args(argv)
    params = QUICK if args.quick else FULL
    if args.duration:
        params = Params(**{**_fields(params), "duration_s": args.duration})
    with _cleanup_on_sigterm():
        result = _load_test(params, progress=True, keep_db=args.keep_db)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


def _fields(params: Params) -> dict[str, Any]:
    return {name: getattr(params, name) for name in Params.__dataclass_fields__}


if __name__ == "__main__":
    main()
