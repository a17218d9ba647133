"""`iiot backup` / `iiot restore` on both stores: consistent while ingesting, every row back.

The platform ingests through its real pipeline while the backup runs; the backup is then
restored into an empty database and compared row by row with the source. Damaged files
and non-empty targets are refused with a clear message, and nothing is touched.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
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

from iiot.alarms.model import Severity
from iiot.backup import BackupError, backup, read_manifest, restore
from iiot.backup_format import KINDS
from iiot.backup_format import TABLES as BACKED_UP
from iiot.model import Role
from iiot.storage import open_store
from iiot.storage.alarm_base import alarm_store_for
from iiot.storage.control import NewCommand
from tests.support import platform_env, running_platform, temporary_pg_database

TABLES = {name: ", ".join(KINDS[name]) for name, _ in BACKED_UP}
BASE_TS = 1_767_225_600_000
KEYS = ("temp", "count", "running", "label")
MAX_MESSAGES = 3000  # per device: a bound, so ingestion cannot run away


def _normal(value: Any, kind: str) -> Any:
    """One representation for both stores: UUIDs, booleans (0/1 in SQLite), parsed JSON."""
    if value is None:
        return None
    if kind == "uuid" and isinstance(value, bytes):
        return uuid.UUID(bytes=value)
    if kind == "bool":
        return bool(value)
    if kind == "json":
        return json.loads(value)
    if kind == "bytes":
        return bytes(value)
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
    else:
        pg = await asyncpg.connect(url)
        try:
            raw = [tuple(r) for r in await pg.fetch(f"SELECT {columns} FROM {table}")]
        finally:
            await pg.close()
    kinds = list(KINDS[table].values())
    return sorted((tuple(map(_normal, row, kinds)) for row in raw), key=repr)


async def present_tables(url: str) -> list[str]:
    """The backed-up tables this database has (a table of a later migration may not be)."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url[len("sqlite:///") :])
        try:
            names = {n for (n,) in conn.execute("SELECT name FROM sqlite_schema")}
        finally:
            conn.close()
    else:
        pg = await asyncpg.connect(url)
        try:
            names = {r[0] for r in await pg.fetch("SELECT tablename FROM pg_tables")}
        finally:
            await pg.close()
    return [table for table in TABLES if table in names]


async def all_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table."""
    return {table: await table_rows(url, table) for table in await present_tables(url)}


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
    for table in ("tenants", "users"):
        assert restored[table] == final[table]
    # Presence (last_seen, connected) moved on after the snapshot; the rest did not.
    assert [r[:8] + r[10:] for r in restored["devices"]] == [
        r[:8] + r[10:] for r in final["devices"]
    ]
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


# --- every kind of user data, across both stores ----------------------------------------
STORES = ("sqlite", "postgres")


def _url(kind: str, name: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / f'{name}.db'}"
    return str(request.getfixturevalue("pg_url" if name == "source" else "second_pg_url"))


@pytest.fixture(params=[(s, t) for s in STORES for t in STORES], ids="-to-".join)
def cross(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(source, empty target) URLs for every pair of stores."""
    source_kind, target_kind = request.param
    return (
        _url(source_kind, "source", request, tmp_path),
        _url(target_kind, "target", request, tmp_path),
    )


@pytest.fixture(params=STORES)
def target_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each store."""
    return _url(request.param, "target", request, tmp_path)


async def _seed_everything(url: str) -> dict[str, Any]:
    """A tenant with a user, a gateway and its child, a command with transitions, attributes
    of every scope, a rule with its state, an open and a cleared alarm, a webhook with a
    queued event and a logged delivery. Returns the ids a test looks at again."""
    async with open_store(url) as store:
        alarms = alarm_store_for(store)
        tenant = await store.create_tenant("acme")
        user = await store.create_user(tenant.id, "ops", "hash-1", Role.TENANT_USER)
        await store.update_user(None, user.id, password_hash="hash-2")  # token_version 1
        # The child is created first, then pointed at its gateway: in the dumped table the
        # child may well come before the gateway it refers to.
        child = await store.create_device(tenant.id, "plc-1", "token-child")
        gateway = await store.create_device(tenant.id, "gw", "token-gw", type="gateway")
        await store.delete_device(None, child.id)
        child = await store.create_device(
            tenant.id, "plc-1", "token-child-2", gateway_id=gateway.id
        )
        await store.set_device_certificate(None, gateway.id, "ab" * 32)
        await store.record_presence({gateway.id: 1_000, child.id: 2_000}, {gateway.id: True})
        command = await store.control.create_command(
            tenant.id,
            NewCommand(
                tenant_id=tenant.id,
                device_id=child.id,
                method="setValve",
                params={"open": True, "ratio": 0.25, "tags": ["a", None]},
                oneway=False,
                persistent=True,
                timeout_ms=1000,
                expires_at=10_000_000,
                retries=1,
                sent_by=user.id,
            ),
            100,
        )
        await store.control.transition_command(
            None, command.id, "SENT", ("QUEUED",), 200, deadline=1200, add_attempts=1
        )
        await store.control.transition_command(
            None, command.id, "SUCCESSFUL", ("SENT",), 300, response={"rpm": 900}
        )
        for scope, values in (
            ("client", {"fw": "1.2\t3", "uptime": 17}),
            ("shared", {"setpoint": 21.5, "modes": {"eco": True}}),
            ("server", {"site": "hall\\2", "none": None}),
        ):
            await store.control.set_attributes(None, child.id, scope, values, 400)
        rule = await alarms.create_rule(
            tenant.id, {"name": "hot", "target": {"device_id": str(child.id)}}
        )
        await alarms.save_rule_state(rule.id, child.id, {"active": True, "pending_since": 5})
        hook = await alarms.create_webhook(
            tenant.id, "http://127.0.0.1:9/hook", "s3cret", ("alarm.raised", "alarm.cleared")
        )
        alarm, _ = await alarms.raise_alarm(
            tenant.id, child.id, "HighTemp", Severity.MAJOR, 500, 81.5, rule.id, {"k": "é"}
        )
        cleared, _ = await alarms.raise_alarm(
            tenant.id, gateway.id, "Offline", Severity.MINOR, 510, None, None, {}
        )
        await alarms.clear_alarm(None, cleared.id, 520)
        # One event delivered (logged), the others still queued.
        [first, *_] = await alarms.claim_outbox(2**62, 1, 60_000)
        await alarms.finish_attempt(first, 600, 500, "HTTP 500", 12, 700, "retrying")
        return {
            "tenant": tenant.id,
            "user": user.id,
            "gateway": gateway.id,
            "child": child.id,
            "command": command.id,
            "alarm": alarm.id,
            "hook": hook.id,
        }


async def test_every_table_round_trips_between_stores(
    cross: tuple[str, str], tmp_path: Path
) -> None:
    source, target = cross
    ids = await _seed_everything(source)
    archive = tmp_path / "all.backup"
    manifest = await backup(source, archive)
    assert set(manifest.tables) == set(await present_tables(source))
    expected_rows = {
        "devices": 2,
        "commands": 1,
        "command_transitions": 3,
        "device_attributes": 6,
        "alarm_rules": 1,
        "alarm_rule_state": 1,
        "alarms": 2,
        "webhooks": 1,
        "webhook_outbox": 3,  # raised, raised, cleared
        "webhook_deliveries": 1,
    }
    assert {t: manifest.rows(t) for t in expected_rows} == expected_rows

    await restore(target, archive)
    before = await all_rows(source)
    assert await all_rows(target) == before
    # The dump follows the database's own row order: a child may come before its gateway.
    # That reference is checked once every device is in, so the restore still succeeds.
    child_first = tmp_path / "child-first.backup"
    _rewrite(archive, child_first, functools.partial(_child_first, str(ids["child"])))
    await restore(target, child_first, force=True)
    assert await all_rows(target) == before

    async with open_store(target) as store:
        alarms = alarm_store_for(store)
        user = await store.get_user(None, ids["user"])
        assert user.token_version == 1
        child = await store.get_device(None, ids["child"])
        assert child.gateway_id == ids["gateway"]
        gateway = await store.get_device(None, ids["gateway"])
        assert (gateway.type, gateway.connected, gateway.last_seen) == ("gateway", True, 1_000)
        attrs = await store.control.get_attributes(
            None, ids["child"], ("client", "shared", "server"), None
        )
        assert {s: {k: v.value for k, v in a.items()} for s, a in attrs.items()} == {
            "client": {"fw": "1.2\t3", "uptime": 17},
            "shared": {"setpoint": 21.5, "modes": {"eco": True}},
            "server": {"site": "hall\\2", "none": None},
        }
        assert await alarms.rule_states() == {
            (r.id, ids["child"]): {"active": True, "pending_since": 5}
            for r in await alarms.all_rules()
        }
        # Still one open alarm per (device, type): raising again updates the restored one,
        # and the database refuses a second open row outright.
        again, kind = await alarms.raise_alarm(
            ids["tenant"], ids["child"], "HighTemp", Severity.CRITICAL, 900, 99, None, {}
        )
        assert again.id == ids["alarm"] and kind == "updated"
        with pytest.raises((sqlite3.IntegrityError, asyncpg.UniqueViolationError)):
            await _insert_open_alarm(target, ids["tenant"], ids["child"])
        # Numbering continues above the restored rows: a new transition sorts last and new
        # outbox rows and deliveries get fresh ids.
        done = await store.control.transition_command(
            None, ids["command"], "CANCELED", ("SUCCESSFUL",), 1000
        )
        assert done is not None
        assert [s for s, _ in done.transitions] == ["QUEUED", "SENT", "SUCCESSFUL", "CANCELED"]
        assert await alarms.enqueue_event(ids["tenant"], "alarm.raised", "new-event", b"{}") == 1
        items = await alarms.claim_outbox(2**62, 10, 60_000)
        assert len(items) == 4  # the 3 from the backup (one being retried) + the new one
        new_item = next(i for i in items if i.event_id == "new-event")
        assert new_item.id > max(r[0] for r in before["webhook_outbox"])
        await alarms.finish_attempt(new_item, 1100, 200, None, 5, None, "delivered")
        log = await alarms.list_deliveries(ids["tenant"], ids["hook"], 10, 0)
        assert [d.outcome for d in log.items] == ["delivered", "retrying"]


async def _insert_open_alarm(url: str, tenant_id: uuid.UUID, device_id: uuid.UUID) -> None:
    values = (uuid.uuid4(), tenant_id, device_id, "HighTemp", "MAJOR", 3, 1, 1)
    sql = (
        "INSERT INTO alarms (id, tenant_id, device_id, type, severity, severity_rank,"
        " start_ts, end_ts) VALUES ({})"
    )
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url[len("sqlite:///") :])
        try:
            conn.execute(
                sql.format(", ".join("?" * 8)),
                (values[0].bytes, values[1].bytes, values[2].bytes, *values[3:]),
            )
        finally:
            conn.close()
    else:
        pg = await asyncpg.connect(url)
        try:
            await pg.execute(sql.format(", ".join(f"${n}" for n in range(1, 9))), *values)
        finally:
            await pg.close()


# edit(table, columns, lines) -> (columns, lines), or None to leave the table out.
Edit = Callable[[str, list[str], list[str]], tuple[list[str], list[str]] | None]


def _rewrite(archive: Path, new: Path, edit: Edit, schema_version: int | None = None) -> None:
    """A copy of a backup with its tables edited, and a manifest whose checksums match."""
    with tarfile.open(archive) as old:
        manifest = json.loads(_member(old, "manifest.json"))
        members: dict[str, bytes] = {}
        for name, entry in list(manifest["tables"].items()):
            lines = gzip.decompress(_member(old, entry["file"])).decode().splitlines()
            edited = edit(name, entry["columns"], lines)
            if edited is None:
                del manifest["tables"][name]
                continue
            entry["columns"], lines = edited
            data = gzip.compress("".join(f"{line}\n" for line in lines).encode())
            entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
            members[entry["file"]] = data
    if schema_version is not None:
        manifest["schema_version"] = schema_version
    with tarfile.open(new, "w") as out:
        for name, data in [("manifest.json", json.dumps(manifest).encode()), *members.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))


def _as_first_release(
    table: str, columns: list[str], lines: list[str]
) -> tuple[list[str], list[str]] | None:
    """What a backup held before devices gained gateways and users token versions, and
    before commands, attributes, alarms and webhooks existed."""
    first = {
        "tenants": columns,
        "users": ["id", "username", "password_hash", "role", "tenant_id", "created_at"],
        "devices": ["id", "tenant_id", "name", "status", "token_hash", "created_at"],
        "telemetry": columns,
        "telemetry_latest": columns,
    }
    if table not in first:
        return None
    positions = [columns.index(c) for c in first[table]]
    return first[table], ["\t".join(line.split("\t")[p] for p in positions) for line in lines]


def _child_first(
    child: str, table: str, columns: list[str], lines: list[str]
) -> tuple[list[str], list[str]]:
    if table == "devices":
        lines = sorted(lines, key=lambda line: not line.startswith(child))
    return columns, lines


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    handle = tar.extractfile(name)
    assert handle is not None
    return handle.read()


async def test_backup_made_before_the_new_tables_still_restores(
    target_url: str, tmp_path: Path
) -> None:
    source, target = f"sqlite:///{tmp_path / 'source.db'}", target_url
    ids = await _seed_everything(source)
    archive = tmp_path / "new.backup"
    await backup(source, archive)
    old = tmp_path / "old.backup"
    first_tables = {"tenants", "users", "devices", "telemetry", "telemetry_latest"}
    _rewrite(archive, old, _as_first_release, schema_version=3)
    manifest = await restore(target, old)
    assert set(manifest.tables) == first_tables
    restored = await all_rows(target)
    source_rows = await all_rows(source)
    assert restored["tenants"] == source_rows["tenants"]
    assert [r[:6] for r in restored["users"]] == [r[:6] for r in source_rows["users"]]
    assert [r[6:] for r in restored["users"]] == [(0,)]  # token_version: its default
    assert [r[:6] for r in restored["devices"]] == [r[:6] for r in source_rows["devices"]]
    assert {r[6:] for r in restored["devices"]} == {("default", None, None, False, None)}
    assert {t: len(restored[t]) for t in restored if t not in first_tables} == {
        t: 0 for t in restored if t not in first_tables
    }
    async with open_store(target) as store:
        assert (await store.get_device(None, ids["child"])).gateway_id is None

    # A damaged member of a new table is refused like any other.
    data = archive.read_bytes()
    with tarfile.open(archive) as tar:
        member = tar.getmember("data/webhook_outbox.tsv.gz")
        offset = member.offset_data + member.size // 2
    damaged = tmp_path / "damaged.backup"
    damaged.write_bytes(data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1 :])
    with pytest.raises(BackupError, match=r"webhook_outbox\.tsv\.gz does not match its checksum"):
        await restore(target, damaged, force=True)
    assert await all_rows(target) == restored


async def test_database_not_yet_upgraded_is_backed_up_with_what_it_has(tmp_path: Path) -> None:
    source_file = tmp_path / "source.db"
    await _seeded(f"sqlite:///{source_file}")
    conn = sqlite3.connect(source_file)
    try:  # as if the schema predated the purge queue, the delivery log and token versions
        conn.execute("DROP TABLE telemetry_purges")
        conn.execute("DROP TABLE webhook_deliveries")
        conn.execute("ALTER TABLE users DROP COLUMN token_version")
    finally:
        conn.close()
    archive = tmp_path / "a.backup"
    manifest = await backup(f"sqlite:///{source_file}", archive)
    assert "webhook_deliveries" not in manifest.tables
    assert "token_version" not in manifest.tables["users"].columns
    target = f"sqlite:///{tmp_path / 'target.db'}"
    await restore(target, archive)
    source = f"sqlite:///{source_file}"
    for table in ("tenants", "devices"):
        assert await table_rows(target, table) == await table_rows(source, table)
    assert len(await table_rows(target, "devices")) == 1
