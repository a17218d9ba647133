"""deploy/nginx/iiot.conf in a real nginx: TLS termination in front of the running platform.

The test renders the shipped configuration with a throwaway self-signed certificate, free
loopback ports and temporary log paths, starts the Debian `nginx` binary on it, and drives
login, tenant and device management, and device telemetry over HTTPS.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import (
    ADMIN_PASSWORD,
    free_port,
    platform_env,
    running_platform,
    self_signed_certificate,
    services_required,
    wait_for_port,
)

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "iiot.conf"


def _nginx() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        message = "nginx is not installed (Debian package `nginx`)"
        if services_required():
            pytest.fail(message)
        pytest.skip(message)
    return found


def _render(folder: Path, upstream: int, https: int, http: int, cert: Path, key: Path) -> Path:
    """The shipped config with test ports and paths; each replaced text must be there."""
    text = CONFIG.read_text()
    replacements = {
        "server 127.0.0.1:8080;": f"server 127.0.0.1:{upstream};",
        "listen 443 ssl http2;": f"listen 127.0.0.1:{https} ssl http2;",
        "listen [::]:443 ssl http2;": "",
        "listen 80;": f"listen 127.0.0.1:{http};",
        "listen [::]:80;": "",
        "/etc/iiot/tls/fullchain.pem": str(cert),
        "/etc/iiot/tls/privkey.pem": str(key),
        "/var/log/nginx/": f"{folder}/",
    }
    for old, new in replacements.items():
        assert old in text, f"deploy/nginx/iiot.conf no longer contains {old!r}"
        text = text.replace(old, new)
    (folder / "iiot.conf").write_text(text)
    main = folder / "nginx.conf"
    # Root would hand the workers to `nobody`, who cannot use the private temp folder.
    user = "user root;\n" if os.geteuid() == 0 else ""
    main.write_text(
        f"{user}worker_processes 1;\n"
        f"error_log {folder}/error.log warn;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    client_body_temp_path {folder}/client_body;\n"
        f"    proxy_temp_path {folder}/proxy;\n"
        f"    fastcgi_temp_path {folder}/fastcgi;\n"
        f"    uwsgi_temp_path {folder}/uwsgi;\n"
        f"    scgi_temp_path {folder}/scgi;\n"
        f"    include {folder}/iiot.conf;\n"
        "}\n"
    )
    return main


@contextlib.contextmanager
def _running_nginx(binary: str, folder: Path, config: Path, port: int) -> Iterator[None]:
    proc = subprocess.Popen(
        [
            binary,
            "-c", str(config),
            "-p", str(folder),
            "-e", str(folder / "error.log"),
            "-g", f"daemon off; pid {folder / 'nginx.pid'};",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        try:
            wait_for_port("127.0.0.1", port, timeout_s=15)
        except TimeoutError:
            proc.kill()
            output = proc.communicate(timeout=10)[0].decode(errors="replace")
            log = (folder / "error.log").read_text() if (folder / "error.log").exists() else ""
            pytest.fail(f"nginx did not start: {output}\n{log}")
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful: finish requests, then exit
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def test_api_and_device_telemetry_through_nginx_over_https(tmp_path: Path) -> None:
    binary = _nginx()
    folder = tmp_path / "nginx"
    folder.mkdir()
    cert, key = self_signed_certificate(folder)
    api_port, https_port, http_port = free_port(), free_port(), free_port()
    config = _render(folder, api_port, https_port, http_port, cert, key)
    env = platform_env(tmp_path / "data", IIOT_HTTP_PORT=str(api_port))
    trust = ssl.create_default_context(cafile=str(cert))

    async with running_platform(env):
        with _running_nginx(binary, folder, config, https_port):
            base = f"https://localhost:{https_port}"
            async with httpx.AsyncClient(base_url=base, verify=trust, timeout=30) as client:
                login = await client.post(
                    "/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
                )
                assert login.status_code == 200, login.text
                # Security headers on every answer; no version disclosed.
                assert login.headers["strict-transport-security"].startswith("max-age=")
                assert login.headers["x-content-type-options"] == "nosniff"
                assert login.headers["server"] == "nginx"
                client.headers["Authorization"] = f"Bearer {login.json()['access_token']}"

                tenant = await client.post("/api/tenants", json={"name": "acme"})
                assert tenant.status_code == 201, tenant.text
                device = await client.post(
                    "/api/devices", json={"name": "press-1", "tenant_id": tenant.json()["id"]}
                )
                assert device.status_code == 201, device.text
                device_id, token = device.json()["id"], device.json()["token"]

                sent = await client.post(
                    f"/api/v1/{token}/telemetry",
                    content=b'{"ts": 1767225600000, "values": {"temperature": 21.5}}',
                    headers={"Content-Type": "application/json"},
                )
                assert sent.status_code == 200, sent.text
                bad = await client.post(f"/api/v1/{token}/telemetry", content=b"{not json")
                assert bad.status_code == 400 and "detail" in bad.json()
                unknown = await client.post("/api/v1/no-such-token/telemetry", content=b"{}")
                assert unknown.status_code == 401

                latest = await client.get(f"/api/devices/{device_id}/telemetry/latest")
                assert latest.status_code == 200
                assert latest.json()["temperature"] == {"ts": 1767225600000, "value": 21.5}
                assert (await client.get("/readyz")).json()["status"] == "ready"

                # Oversized management bodies are cut off before they reach a worker.
                huge = await client.post("/api/tenants", content=b"x" * (2 * 1024 * 1024))
                assert huge.status_code == 413

            # Plain HTTP only redirects to HTTPS.
            async with httpx.AsyncClient(timeout=10) as plain:
                answer = await plain.get(f"http://127.0.0.1:{http_port}/api/tenants")
                assert answer.status_code == 301
                assert answer.headers["location"].startswith("https://")

            # The certificate is really checked: an untrusting client is refused.
            async with httpx.AsyncClient(base_url=base, timeout=10) as untrusting:
                with pytest.raises(httpx.ConnectError):
                    await untrusting.get("/healthz")

    # The device token was in a URL: the access log must not show it.
    access_log = (folder / "iiot.access.log").read_text()
    assert "/api/v1/<token>/telemetry" in access_log
    assert token not in access_log
