"""The `iiot` command for daily tasks, run as a user runs it (`python -m iiot ...`)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.cli_helpers import clean_environ, iiot, wait_until
from tests.support import ADMIN_PASSWORD, free_port, platform_env, platform_process


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}"
    return done.stdout


def _one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> str:
    """The command failed with exactly one line on stderr that holds every word."""
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("iiot: error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _token(created: str) -> tuple[str, str]:
    """(device id, token) from `device create` output."""
    fields = dict(line.split(" ", 1) for line in created.splitlines() if " " in line)
    return fields["device"].split("id=")[1], fields["token"]


def test_a_command_elsewhere_refuses_to_make_a_new_database(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"IIOT_LOG_LEVEL": "WARNING"}
    for args in (("tenant", "list"), ("device", "create", "--tenant", "acme", "--name", "p")):
        line = _one_line_error(iiot(env, *args, cwd=elsewhere), "no database at")
        assert str(elsewhere / "data" / "iiot.db") in line
        assert "IIOT_DATA_DIR" in line
    assert not (elsewhere / "data").exists()
    # Pointed at the platform's data directory, the same command works from anywhere.
    data = tmp_path / "platform-data"
    _ok(iiot(platform_env(data), "migrate"))
    assert _ok(iiot(platform_env(data), "tenant", "list", cwd=elsewhere)).strip() == (
        "NAME  ID  RETENTION DAYS  CREATED AT\n(none)"
    )


def test_unexpected_errors_are_one_line(tmp_path: Path) -> None:
    env = platform_env(tmp_path / "data")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "iiot.db").write_bytes(b"not a database, " * 512)
    done = iiot(env, "tenant", "list")
    _one_line_error(done, "not a database")
    assert "Traceback" not in done.stderr


def test_daily_commands(tmp_path: Path) -> None:
    env = platform_env(tmp_path / "data")
    _ok(iiot(env, "migrate"))
    _ok(iiot(env, "tenant", "create", "acme"))
    device_id, _ = _token(_ok(iiot(env, "device", "create", "--tenant", "acme", "--name", "p1")))
    _ok(iiot(env, "device", "create", "--tenant", "acme", "--name", "p2"))
    _one_line_error(iiot(env, "device", "show", "p1"), "not a device id", "--tenant")

    table = _ok(iiot(env, "device", "list", "--tenant", "acme")).splitlines()
    assert table[0].split() == ["NAME", "ID", "TENANT", "STATUS", "CREATED", "AT"]
    assert [row.split()[:4] for row in table[1:]] == [
        ["p1", device_id, "acme", "active"],
        ["p2", table[2].split()[1], "acme", "active"],
    ]
    devices = json.loads(_ok(iiot(env, "device", "list", "--json")))
    assert [(d["name"], d["status"]) for d in devices] == [("p1", "active"), ("p2", "active")]

    _ok(iiot(env, "device", "disable", "p1", "--tenant", "acme"))
    shown = json.loads(_ok(iiot(env, "device", "show", device_id, "--json")))
    assert (shown["name"], shown["status"], shown["latest"]) == ("p1", "disabled", {})
    _ok(iiot(env, "device", "enable", device_id))
    _one_line_error(iiot(env, "device", "delete", device_id), "--yes")
    _ok(iiot(env, "device", "delete", device_id, "--yes"))
    _one_line_error(iiot(env, "device", "show", device_id))

    tenant = json.loads(_ok(iiot(env, "tenant", "show", "acme", "--json")))
    assert (tenant["name"], tenant["devices"], tenant["users"]) == ("acme", 1, 0)
    _ok(iiot(env, "tenant", "disable", "acme"))
    assert json.loads(_ok(iiot(env, "tenant", "show", "acme", "--json")))["devices_disabled"] == 1
    _ok(iiot(env, "tenant", "enable", "acme"))
    tenants = json.loads(_ok(iiot(env, "tenant", "list", "--json")))
    assert [t["name"] for t in tenants] == ["acme"]
    _ok(iiot(env, "tenant", "delete", "acme", "--yes"))
    assert json.loads(_ok(iiot(env, "tenant", "list", "--json"))) == []


def test_passwords_never_come_from_the_command_line(tmp_path: Path) -> None:
    env = platform_env(tmp_path / "data")
    _ok(iiot(env, "migrate"))
    _ok(iiot(env, "tenant", "create", "acme"))
    create = ("user", "create", "--username", "bob", "--tenant", "acme")
    _one_line_error(iiot(env, *create, "--password", "secret-123"), "not accepted")
    _ok(iiot({**env, "IIOT_NEW_PASSWORD": "password-one"}, *create))
    _one_line_error(iiot(env, "user", "reset-password", "bob", stdin="short\n"), "8 to 72")
    _ok(iiot(env, "user", "reset-password", "bob", stdin="password-two\n"))
    users = json.loads(_ok(iiot(env, "user", "list", "--tenant", "acme", "--json")))
    assert [(u["username"], u["role"], u["status"]) for u in users] == [
        ("bob", "tenant_user", "active")
    ]


def _uals(port: int, security: str, node: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(Path(sys.executable).parent / "uals", "-u", f"opc.tcp://127.0.0.1:{port}/iiot/"),
            *(f"--security={security}", "--user", "admin", "--password", ADMIN_PASSWORD),
            *("-n", node, "-d", "3", "--timeout", "10"),
        ],
        env=clean_environ({}),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _login(http: str, username: str, password: str) -> int:
    body = {"username": username, "password": password}
    return httpx.post(f"{http}/api/auth/login", json=body, timeout=10).status_code


def _running_platform_follows_the_cli(env: dict[str, str], tmp_path: Path) -> None:
    http = f"http://127.0.0.1:{env['IIOT_HTTP_PORT']}"
    opcua = int(env["IIOT_OPCUA_PORT"])
    certs = tmp_path / "certs"
    with platform_process(env) as proc:
        _ok(iiot(env, "opcua", "client-cert", "tools", "--dir", str(certs)))
        security = f"Basic256Sha256,SignAndEncrypt,{certs / 'tools.der'},{certs / 'tools.key.pem'}"
        _ok(iiot(env, "tenant", "create", "acme"))
        created = _ok(iiot(env, "device", "create", "--tenant", "acme", "--name", "press-1"))
        device_id, token = _token(created)

        def tree(present: bool) -> str | None:
            """The browsed tree once the device is in it (present) or gone from it."""
            done = _uals(opcua, security, "ns=2;s=Tenants")
            if done.returncode != 0:
                return None  # the client failed: no answer either way
            return done.stdout if (f"device:{device_id}" in done.stdout) == present else None

        # In the OPC UA address space before the device sends anything.
        assert "press-1" in wait_until(lambda: tree(True), "the device in OPC UA", timeout_s=60)

        url = f"{http}/api/v1/{token}/telemetry"
        assert httpx.post(url, json={"t": 1}, timeout=10).status_code == 200
        _ok(iiot(env, "device", "disable", device_id))
        wait_until(
            lambda: True if httpx.post(url, json={"t": 2}, timeout=10).status_code == 403 else None,
            "the device refused after `device disable`",
        )
        _ok(iiot(env, "device", "delete", device_id, "--yes"))
        assert "acme" in wait_until(lambda: tree(False), "the device gone from OPC UA", 60)

        _ok(iiot({**env, "IIOT_NEW_PASSWORD": "password-one"}, "user", "create",
                 "--username", "bob", "--tenant", "acme"))  # fmt: skip
        answer = httpx.post(
            f"{http}/api/auth/login", json={"username": "bob", "password": "password-one"}
        )
        bob = {"Authorization": f"Bearer {answer.json()['access_token']}"}
        assert httpx.get(f"{http}/api/devices", headers=bob).status_code == 200
        _ok(iiot(env, "user", "disable", "bob"))
        assert _login(http, "bob", "password-one") == 401
        assert httpx.get(f"{http}/api/devices", headers=bob).status_code == 401
        _ok(iiot(env, "user", "enable", "bob"))
        _ok(iiot(env, "user", "reset-password", "bob", stdin="password-two\n"))
        assert _login(http, "bob", "password-two") == 200
        _one_line_error(iiot(env, "user", "disable", "admin"), "only active sysadmin")
    assert proc.stdout is not None
    log = proc.stdout.read().decode().strip().splitlines()
    assert log[-1].endswith("INFO iiot: stopped"), log[-3:]


def _ports(data: Path, **extra: str) -> dict[str, str]:
    return platform_env(
        data,
        IIOT_HTTP_PORT=str(free_port()),
        IIOT_OPCUA_PORT=str(free_port()),
        IIOT_LOG_LEVEL="INFO",
        **extra,
    )


def test_sqlite_platform_follows_the_cli(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _running_platform_follows_the_cli(_ports(data), tmp_path)
    # Secrets and the database are the owner's only.
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in ("iiot.db", "jwt-secret"):
        if (data / name).exists():
            assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name


@pytest.mark.postgres
async def test_postgres_platform_follows_the_cli(tmp_path: Path, pg_url: str) -> None:
    import asyncio

    env = _ports(tmp_path / "data", IIOT_DATABASE_URL=pg_url)
    await asyncio.to_thread(_running_platform_follows_the_cli, env, tmp_path)


def test_opcua_rejected_certificate_trusted_by_thumbprint(tmp_path: Path) -> None:
    from iiot.adapters.opcua_pki import write_self_signed

    env = _ports(tmp_path / "data")
    cert, key = tmp_path / "scada.der", tmp_path / "scada.pem"
    write_self_signed(cert, key, "scada", "urn:example.org:FreeOpcUa:opcua-asyncio", ["localhost"])
    security = f"Basic256Sha256,SignAndEncrypt,{cert},{key}"
    with platform_process(env):
        first = _uals(int(env["IIOT_OPCUA_PORT"]), security, "i=85")
        assert first.returncode != 0
        rejected: list[dict[str, Any]] = [
            c
            for c in json.loads(_ok(iiot(env, "opcua", "certs", "--json")))
            if c["state"] == "rejected"
        ]
        assert [c["name"] for c in rejected] == ["scada"]
        _ok(iiot(env, "opcua", "trust", rejected[0]["thumbprint"][:8]))
        states = {
            c["name"]: c["state"] for c in json.loads(_ok(iiot(env, "opcua", "certs", "--json")))
        }
        assert states["scada"] == "trusted"
        second = _uals(int(env["IIOT_OPCUA_PORT"]), security, "i=85")
        assert second.returncode == 0, second.stderr
        assert "Tenants" in second.stdout
    assert os.path.exists(tmp_path / "data" / "pki" / "trusted")
