"""deploy/: systemd units pass `systemd-analyze verify`; Prometheus files name real metrics.

(deploy/nginx/iiot.conf runs in a real nginx in tests/e2e/test_nginx_tls.py.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from iiot.config import Settings
from iiot.metrics import Metrics
from iiot.retention import RetentionJob
from iiot.services import HealthBoard

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    units = sorted((DEPLOY / "systemd").glob("iiot*.*"))
    assert {u.name for u in units} >= {
        "iiot.service",
        "iiot-api.service",
        "iiot-ingest.service",
        "iiot-backup.service",
        "iiot-backup.timer",
    }
    venv = str(Path(sys.executable).parent.parent)
    for unit in units:
        # verify checks that ExecStart binaries exist: point them at this checkout's venv.
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/iiot/.venv", venv))
    done = subprocess.run(
        [analyze, "verify", "--man=no", *(str(tmp_path / u.name) for u in units)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        # Only the system this runs on: no iiot user, or no systemd running as PID 1.
        if line.strip() and "iiot" in line and "user" not in line.lower()
    ]
    assert done.returncode == 0 and problems == [], done.stdout + done.stderr


def _exported_names() -> set[str]:
    metrics = Metrics()
    services: Any = SimpleNamespace(settings=Settings(), metrics=metrics, health=HealthBoard())
    RetentionJob(services)  # registers its metrics
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        names.update(family.name + s for s in suffixes.get(family.type, []))
    return names


def test_alert_rules_use_metrics_the_platform_exports() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exported = _exported_names()
    backup_unit = (DEPLOY / "systemd" / "iiot-backup.service").read_text()
    alerts = {r["alert"]: r for group in rules["groups"] for r in group["rules"]}
    for name in ("IiotIngestStalled", "IiotProtocolDown", "IiotQueueBackingUp", "IiotDiskFilling"):
        assert name in alerts
    for rule in alerts.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        for metric in re.findall(r"\biiot_[a-z_]+", rule["expr"]):
            # The backup timestamp comes from the backup unit via node_exporter.
            assert metric in exported or metric in backup_unit, f"{rule['alert']}: {metric}"


def test_scrape_config_matches_the_unit_ports() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "iiot"]
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    api = (DEPLOY / "systemd" / "iiot-api.service").read_text()
    ingest = (DEPLOY / "systemd" / "iiot-ingest.service").read_text()
    api_port = re.search(r"IIOT_HTTP_PORT=(\d+)", api)
    ingest_port = re.search(r"IIOT_HTTP_PORT=(\d+)", ingest)
    assert api_port and ingest_port
    assert targets == {f"127.0.0.1:{api_port[1]}", f"127.0.0.1:{ingest_port[1]}"}
