"""A private, throwaway PostgreSQL cluster for tests that stop, crash or cut the server.

Never touches the shared server: the cluster lives in its own temporary directory, on its
own port, with its Unix socket inside that directory. PostgreSQL refuses to run as root,
so when the tests run as root the cluster belongs to the `postgres` system user.

    with private_cluster() as cluster:      # or the `pg_cluster` fixture
        url = cluster.url()
        cluster.stop(); cluster.start(); cluster.terminate_connections()
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support import free_port, services_required

__all__ = ["PgCluster", "find_pg_bin", "pg_cluster", "private_cluster"]

_OWNER = "postgres"  # the system user that owns the cluster when tests run as root


def find_pg_bin() -> Path | None:
    """The directory of initdb/pg_ctl (newest installed version), or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    for directory in reversed(candidates):
        if (Path(directory) / "initdb").exists():
            return Path(directory)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PgCluster:
    """One PostgreSQL server in a temporary directory, started and stopped on demand."""

    def __init__(self, bin_dir: Path) -> None:
        """Create (initdb) the cluster in a new temporary directory; not started yet."""
        self.bin_dir = bin_dir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="iiot-pgcluster-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self._as_owner = os.geteuid() == 0
        if self._as_owner:
            owner = pwd.getpwnam(_OWNER)
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        self.dir.chmod(0o700)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / tool), *args]
        if self._as_owner:
            command = ["runuser", "-u", _OWNER, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{tool} failed ({result.returncode}): {result.stderr.strip()}\n{log}"
            )
        return result

    def url(self, database: str = "postgres") -> str:
        """A connection URL of the cluster over TCP."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
            " -c max_connections=30 -c shared_buffers=16MB -c fsync=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` (disconnect clients cleanly) or `immediate` (as a crash)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        """Whether the server is up."""
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def terminate_connections(self) -> int:
        """Kill every client connection with pg_terminate_backend; returns how many."""
        result = self._run(
            "psql",
            "-h",
            str(self.dir),
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-Atc",
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
        )
        return int(result.stdout.strip())

    def destroy(self) -> None:
        """Stop the server if it runs and delete the cluster's directory."""
        if self.data.exists() and self.running():
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def private_cluster() -> Iterator[PgCluster]:
    """A started private cluster, destroyed afterwards; skips (or fails) without PostgreSQL."""
    bin_dir = find_pg_bin()
    problem = None
    if bin_dir is None:
        problem = "PostgreSQL server binaries (initdb, pg_ctl) are not installed"
    elif os.geteuid() == 0:
        try:
            pwd.getpwnam(_OWNER)
        except KeyError:
            problem = f"running as root and there is no {_OWNER!r} user to own the cluster"
    if problem is not None or bin_dir is None:
        message = problem or "PostgreSQL binaries not found"
        if services_required():
            pytest.fail(message)
        pytest.skip(message)
    cluster = PgCluster(bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_cluster() -> Iterator[PgCluster]:
    """A private PostgreSQL cluster for one test (import this fixture where needed)."""
    with private_cluster() as cluster:
        yield cluster
