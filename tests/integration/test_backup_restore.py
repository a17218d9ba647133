"""`iiot backup` / `iiot restore` on both stores: consistent while ingesting, every row back.

The platform ingests through its real pipeline while the backup runs; the backup is then
restored into an empty database and compared row by row with the source. Damaged files
and non-empty targets are refused with a clear message, and nothing is touched.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from iiot.backup import BackupError, backup, read_manifest, restore
from iiot.storage import open_store
from tests.support import platform_env, running_platform, temporary_pg_database

TABLES = {
    "tenants": "id, name, created_at, retention_days",
    "users": "id, username, password_hash, role, tenant_id, created_at",
    "devices": "id, tenant_id, name, status, token_hash, created_at",
    "telemetry": "device_id, key, ts, num_value, int_value, bool_value, str_value",
    "telemetry_latest": "device_id, key, ts, num_value, int_value, bool_value, str_value",
}
BASE_TS = 1_767_225_600_000
KEYS = ("temp", "count", "running", "label")
MAX_MESSAGES = 3000  # per device: a bound, so ingestion cannot run away


def _normal(value: Any) -> Any:
    """One representation for both stores: UUIDs, booleans (SQLite 0/1 in bool columns)."""
    if isinstance(value, bytes) and len(value) == 16:
        return uuid.UUID(bytes=value)
    return value


async def table_rows(url: str, table: str) -> list[tuple[Any, ...]]:
    """Every row of a table, normalised and sorted."""
    columns = TABLES[table]
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url[len("sqlite:///") :])
        try:
            raw = conn.execute(f"SELECT {columns} FROM {table}").fetchall()
        finally:
            conn.close()
        rows = [tuple(map(_normal, row)) for row in raw]
        if table.startswith("telemetry"):  # bool_value is the 6th column, 0/1 in SQLite
            rows = [(*r[:5], None if r[5] is None else bool(r[5]), r[6]) for r in rows]
    else:
        conn = await asyncpg.connect(url)
        try:
            rows = [tuple(r) for r in await conn.fetch(f"SELECT {columns} FROM {table}")]
        finally:
            await conn.close()
    return sorted(rows, key=repr)


async def all_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table."""
    return {table: await table_rows(url, table) for table in TABLES}


@pytest.fixture
async def second_pg_url(pg_url: str) -> AsyncIterator[str]:
    """Another fresh PostgreSQL database on the same server (the restore target)."""
    async with temporary_pg_database(pg_url) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(source, empty target) database URLs of one store kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'source.db'}", f"sqlite:///{tmp_path / 'target.db'}"
    source = request.getfixturevalue("pg_url")
    return source, request.getfixturevalue("second_pg_url")


def _message(i: int) -> bytes:
    return json.dumps(
        {
            "ts": BASE_TS + i,
            "values": {"temp": 20 + i / 8, "count": i, "running": i % 2 == 0, "label": f"é\t{i}\\"},
        }
    ).encode()


async def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - polls state that other tasks change
            await asyncio.sleep(0.01)
    assert condition(), what


async def test_backup_while_ingesting_restores_every_row(
    urls: tuple[str, str], tmp_path: Path
) -> None:
    source, target = urls
    env = platform_env(tmp_path / "data", IIOT_DATABASE_URL=source, IIOT_BATCH_MAX_DELAY_MS="2")
    archive = tmp_path / "backups" / "iiot.backup"
    async with running_platform(env) as platform:
        services = platform.services
        tenant = await services.store.create_tenant("acme")
        await services.store.update_tenant(None, tenant.id, retention_days=90)
        devices = [await services.registry.create_device(tenant.id, f"press-{n}") for n in range(3)]
        acked = {device.id: 0 for device, _ in devices}  # messages committed per device
        stop = asyncio.Event()

        async def feed(device_id: uuid.UUID, token: str) -> None:
            for i in range(MAX_MESSAGES):
                if stop.is_set():
                    return
                await services.ingestor.ingest_token(token, _message(i), "test")
                acked[device_id] = i + 1

        feeders = [asyncio.create_task(feed(d.id, token)) for d, token in devices]
        try:
            await _wait_for(lambda: min(acked.values()) >= 50, "ingestion started")
            before = dict(acked)
            manifest = await backup(source, archive)
            after = dict(acked)
        finally:
            stop.set()
            await asyncio.gather(*feeders)
    # Ingestion went on while the backup was taken.
    assert sum(after.values()) > sum(before.values())
    assert oct(archive.stat().st_mode & 0o777) == "0o600"
    assert read_manifest(archive) == manifest

    await restore(target, archive)
    restored = await all_rows(target)
    final = await all_rows(source)
    assert {t: len(rows) for t, rows in restored.items()} == {
        t: e.rows for t, e in manifest.tables.items()
    }
    for table in ("tenants", "users", "devices"):
        assert restored[table] == final[table]
    # One snapshot: per device, a gap-free prefix of whole messages, at least everything
    # acknowledged before the backup began, and row for row what the source holds.
    by_device: dict[uuid.UUID, set[int]] = {}
    for row in restored["telemetry"]:
        by_device.setdefault(row[0], set()).add(row[2] - BASE_TS)
    for device, _ in devices:
        count = len(by_device.get(device.id, set()))
        assert by_device.get(device.id, set()) == set(range(count))
        assert before[device.id] <= count <= after[device.id]
        expected = [r for r in final["telemetry"] if r[0] == device.id and r[2] < BASE_TS + count]
        assert [r for r in restored["telemetry"] if r[0] == device.id] == expected
        assert len(expected) == count * len(KEYS)
        latest = [r for r in restored["telemetry_latest"] if r[0] == device.id]
        assert sorted(r[1] for r in latest) == sorted(KEYS)
        assert {r[2] for r in latest} == {BASE_TS + count - 1}
        assert latest == sorted((r for r in expected if r[2] == BASE_TS + count - 1), key=repr)

    # Once ingestion has stopped, a second backup restores to exactly the source.
    await backup(source, archive)
    await restore(target, archive, force=True)
    assert await all_rows(target) == final


async def _seeded(url: str) -> None:
    async with open_store(url) as store:
        tenant = await store.create_tenant("acme")
        await store.create_device(tenant.id, "press-1", "token-hash-1")


async def test_damaged_or_foreign_file_is_refused_before_touching_the_database(
    tmp_path: Path,
) -> None:
    source = f"sqlite:///{tmp_path / 'source.db'}"
    target_file = tmp_path / "target.db"
    target = f"sqlite:///{target_file}"
    await _seeded(source)
    archive = tmp_path / "good.backup"
    await backup(source, archive)
    data = archive.read_bytes()
    with tarfile.open(archive) as tar:
        member = tar.getmember("data/devices.tsv.gz")
        offset = member.offset_data + member.size // 2

    damaged = tmp_path / "damaged.backup"
    damaged.write_bytes(data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1 :])
    truncated = tmp_path / "truncated.backup"
    truncated.write_bytes(data[: len(data) // 2])
    foreign = tmp_path / "foreign.backup"
    foreign.write_text("not a backup at all\n")
    for path, message in [
        (damaged, "does not match its checksum"),
        (truncated, "damaged"),
        (foreign, "not a backup"),
        (tmp_path / "missing.backup", "does not exist"),
    ]:
        with pytest.raises(BackupError, match=message):
            await restore(target, path)
    assert not target_file.exists()  # refused before the database was even opened


async def test_manifest_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    source = f"sqlite:///{tmp_path / 'source.db'}"
    await _seeded(source)
    archive = tmp_path / "a.backup"
    manifest = await backup(source, archive)
    newer = tmp_path / "newer.backup"
    with tarfile.open(archive) as old, tarfile.open(newer, "w") as new:
        for member in old:
            handle = old.extractfile(member)
            assert handle is not None
            content = handle.read()
            if member.name == "manifest.json":
                raw = json.loads(content)
                raw["schema_version"] = manifest.schema_version + 1
                content = json.dumps(raw).encode()
                member.size = len(content)
            new.addfile(member, io.BytesIO(content))
    with pytest.raises(BackupError, match="made by a newer iiot"):
        await restore(f"sqlite:///{tmp_path / 'target.db'}", newer)


async def test_non_empty_target_is_refused_unless_forced(
    urls: tuple[str, str], tmp_path: Path
) -> None:
    source, target = urls
    await _seeded(source)
    async with open_store(target) as store:
        await store.create_tenant("already-here")
    archive = tmp_path / "a.backup"
    await backup(source, archive)
    with pytest.raises(BackupError, match=r"is not empty .*--force"):
        await restore(target, archive)
    assert [r[1] for r in await table_rows(target, "tenants")] == ["already-here"]
    await restore(target, archive, force=True)
    assert await all_rows(target) == await all_rows(source)


async def test_sqlite_backup_restores_into_postgres_and_back(pg_url: str, tmp_path: Path) -> None:
    sqlite_url = f"sqlite:///{tmp_path / 'embedded.db'}"
    env = platform_env(tmp_path / "data", IIOT_DATABASE_URL=sqlite_url)
    async with running_platform(env) as platform:
        tenant = await platform.services.store.create_tenant("acme")
        _, token = await platform.services.registry.create_device(tenant.id, "press-1")
        for i in range(20):
            await platform.services.ingestor.ingest_token(token, _message(i), "test")
    await backup(sqlite_url, tmp_path / "embedded.backup")
    await restore(pg_url, tmp_path / "embedded.backup")
    assert await all_rows(pg_url) == await all_rows(sqlite_url)
    await backup(pg_url, tmp_path / "pg.backup")
    again = f"sqlite:///{tmp_path / 'again.db'}"
    await restore(again, tmp_path / "pg.backup")
    assert await all_rows(again) == await all_rows(sqlite_url)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iiot", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_cli_backup_and_restore(tmp_path: Path) -> None:
    source_env = platform_env(tmp_path / "source")
    target_env = platform_env(tmp_path / "target")
    await _seeded(f"sqlite:///{tmp_path / 'source' / 'iiot.db'}")
    archive = tmp_path / "nightly.backup"

    done = _cli(source_env, "backup", str(archive))
    assert done.returncode == 0, done.stderr
    assert "1 tenants, 0 users, 1 devices" in done.stdout

    done = _cli(target_env, "restore", str(archive))
    assert done.returncode == 0, done.stderr
    assert await all_rows(f"sqlite:///{tmp_path / 'target' / 'iiot.db'}") == await all_rows(
        f"sqlite:///{tmp_path / 'source' / 'iiot.db'}"
    )

    done = _cli(target_env, "restore", str(archive))
    assert done.returncode != 0
    assert done.stderr.strip().startswith("iiot: error: SQLite database")
    assert "--force" in done.stderr and len(done.stderr.strip().splitlines()) == 1

    (tmp_path / "junk.backup").write_bytes(b"\0" * 1000)
    done = _cli(target_env, "restore", "--force", str(tmp_path / "junk.backup"))
    assert done.returncode != 0 and "is not an iiot backup" in done.stderr

    done = _cli(target_env, "restore", "--force", str(archive))
    assert done.returncode == 0, done.stderr
