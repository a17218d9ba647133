"""`iiot device create --mosquitto-passwd` and `iiot mosquitto acl` secure a real Mosquitto."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_mqtt_support import connect, private_mosquitto
from tests.support import platform_env


def iiot(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "iiot", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_generated_files_let_the_device_in_and_keep_others_out(tmp_path: Path) -> None:
    env = platform_env(tmp_path / "data")
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    iiot(env, "migrate")  # commands other than run/migrate/restore never create a database
    iiot(env, "tenant", "create", "acme")
    created = iiot(
        env,
        "device",
        "create",
        "--tenant",
        "acme",
        "--name",
        "press-1",
        "--mosquitto-passwd",
        str(passwd),
    )
    device_id = re.search(r"id=(\S+)", created).group(1)  # type: ignore[union-attr]
    token = re.search(r"token (\S+)", created).group(1)  # type: ignore[union-attr]
    acl.write_text(iiot(env, "mosquitto", "acl", "--platform-user", "iiot"))
    assert oct(passwd.stat().st_mode & 0o777) == "0o600"
    assert "pattern readwrite devices/%u/#" in acl.read_text()

    security = f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n"
    with private_mosquitto(tmp_path, security) as broker:
        client = connect(broker.port, device_id, token, "press-1")
        client.disconnect()
        client.loop_stop()
        with pytest.raises(PermissionError):
            connect(broker.port, device_id, "not-the-token", "press-1-bad")

        # After a rotation the file holds only the new token.
        rotated = iiot(
            env, "device", "rotate", "--id", device_id, "--mosquitto-passwd", str(passwd)
        )
        new_token = re.search(r"token (\S+)", rotated).group(1)  # type: ignore[union-attr]
        assert passwd.read_text().count(device_id) == 1
        broker.stop()  # Mosquitto rereads its password file on start (or SIGHUP)
        broker.start()
        with pytest.raises(PermissionError):
            connect(broker.port, device_id, token, "press-1-old")
        client = connect(broker.port, device_id, new_token, "press-1-new")
        client.disconnect()
        client.loop_stop()
