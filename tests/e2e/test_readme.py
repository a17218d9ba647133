"""The README's "Send a first message" block, run as written against `iiot run`'s defaults.

A fresh directory stands for the clone after `make run`: its `.venv` is this virtual
environment and its `data/` is created by the platform. Only the ports differ from the
defaults (the machine's own services may hold 1883, 5683, 8080), given as the `IIOT_*`
variables that both the platform and the block read, as the README says.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.cli_helpers import clean_environ, wait_until
from tests.support import free_port, services_required, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
OPCUA_DOC = ROOT / "docs" / "protocols-opcua.md"


def readme_block(heading: str, document: Path = README) -> str:
    """The first ```sh block of the document's section with this heading."""
    text = document.read_text(encoding="utf-8")
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```sh\n(.*?)```", section, re.S)
    assert found, f"no sh block under {heading!r}"
    return found.group(1)


def _need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        message = f"{tool} is not installed (Debian package {package})"
        if services_required():
            pytest.fail(message)
        pytest.skip(message)


def test_send_a_first_message_works_as_written(tmp_path: Path) -> None:
    """The README block, then the OPC UA first contact of docs/protocols-opcua.md."""
    _need("coap-client-notls", "libcoap3-bin")
    _need("mosquitto_pub", "mosquitto-clients")
    _need("curl", "curl")
    block = readme_block("## Send a first message")
    opcua_block = readme_block("### asyncua's command-line tools", OPCUA_DOC)
    marker = "=== device: "
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    ports = {
        "IIOT_HTTP_PORT": str(free_port()),
        "IIOT_MQTT_PORT": str(free_port()),
        "IIOT_COAP_PORT": str(free_port(socket.SOCK_DGRAM)),
        "IIOT_OPCUA_PORT": str(free_port()),
    }
    env = clean_environ(ports)
    platform = subprocess.Popen(
        [sys.executable, "-m", "iiot", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port("127.0.0.1", int(ports["IIOT_HTTP_PORT"]))
        wait_for_port("127.0.0.1", int(ports["IIOT_MQTT_PORT"]))
        # The README block, then what the OPC UA block needs from it (the device id).
        first = _bash(f'{block}\necho "{marker}$DEVICE_ID"', tmp_path, env)
        assert first.returncode == 0, f"{first.stdout}\n{first.stderr}"
        output, device_id = first.stdout.rsplit(marker, 1)
        latest = json.loads(output.strip().splitlines()[-1])
        values = {key: point["value"] for key, point in latest.items()}
        assert values == {"temperature": 21.5, "running": True, "pressure": 1.013, "humidity": 40.5}

        # The OPC UA variables appear once the committed values reach the address space
        # (a moment after the REST answer): run the documented block until they are there.
        last: list[str] = []

        def opcua_block_works() -> str | None:
            done = _bash(opcua_block, tmp_path, {**env, "DEVICE_ID": device_id.strip()})
            last[:] = [done.stdout, done.stderr]
            return done.stdout if done.returncode == 0 else None

        try:
            what = "the OPC UA block of docs/protocols-opcua.md"
            opcua = wait_until(opcua_block_works, what, timeout_s=90)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its last output:\n" + "\n".join(last)) from None
    finally:
        platform.terminate()
        platform.wait(timeout=30)
    # uals shows the device's variables; uaread its value; uahistoryread the stored point.
    assert "press-1" in opcua
    assert "telemetry:humidity" in opcua
    lines = opcua.splitlines()
    assert "21.5" in lines
    assert any(line.split()[-2:] == ["Good", "21.5"] for line in lines if line.split())


def _bash(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
