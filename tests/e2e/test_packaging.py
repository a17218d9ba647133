"""The built wheel: what it holds, and `iiot run` from a fresh virtual environment.

The wheel is built (`python -m build`, no isolation: the pinned setuptools of the dev
extra, offline) from a copy of the sources, so the tree stays clean. It is installed with
pip into a new virtual environment; its dependencies are reached through a `.pth` line to
this environment's site-packages (installing them again would take a minute), which
processes no `.pth` of its own, so this checkout's editable `iiot` stays invisible there.
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx

from tests.e2e.cli_helpers import clean_environ
from tests.support import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "iiot"


def _run(*args: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


def _build_wheel(tmp_path: Path) -> Path:
    sources = tmp_path / "sources"
    sources.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, sources / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "src", sources / "src", ignore=ignore)
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, sources)
    (wheel,) = dist.glob("iiot-*.whl")
    return wheel


def _package_files() -> set[str]:
    """Every file of the package in the source tree, as a wheel names it."""
    return {
        "iiot/" + path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_wheel_installs_and_runs(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read("iiot-0.1.0.dist-info/entry_points.txt").decode()
    # Everything of the package: modules, migrations of both stores, py.typed, and any
    # static files (the console's, under iiot/static/); nothing else.
    missing = _package_files() - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert "iiot/storage/migrations/sqlite/0001_init.sql" in names
    assert "iiot/storage/migrations/postgres/0001_init.sql" in names
    assert not [n for n in names if not n.startswith(("iiot/", "iiot-0.1.0.dist-info/"))]
    assert "iiot = iiot.cli:main" in entry_points

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel)
    fresh_site = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    )
    (fresh_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    where = _run(python, "-c", "import iiot; print(iiot.__file__)").strip()
    assert where.startswith(str(fresh_site)), where

    port = free_port()
    env = clean_environ(
        {
            "IIOT_HTTP_PORT": str(port),
            "IIOT_MQTT_PORT": "0",
            "IIOT_COAP_PORT": "0",
            "IIOT_OPCUA_PORT": "0",
            "IIOT_BIND_HOST": "127.0.0.1",
        }
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    proc = subprocess.Popen(
        [venv / "bin" / "iiot", "run"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port("127.0.0.1", port)
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        assert ready.json()["components"]["database"]["state"] == "up"
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0].decode()
    assert "applying SQLite migration 0001_init.sql" in output
    assert output.strip().splitlines()[-1].endswith("stopped")
    assert (workdir / "data" / "iiot.db").exists()
