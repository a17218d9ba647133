"""Backups: one file holding a consistent dump of the database, a manifest and checksums.

A backup is an uncompressed tar archive (mode 0600: it holds password and token hashes):

- `manifest.json` (first member): format and version, source store kind, schema version,
  creation time, and for each table its columns, row count, and the SHA-256 and size of
  its data member;
- `data/<table>.tsv.gz`: the table's rows in PostgreSQL's COPY text format (tab-separated,
  backslash escapes, `\\N` for NULL), gzip-compressed.

The data format is the same for both stores, so a backup of the embedded SQLite database
can be restored into PostgreSQL (the usual way to move off SQLite) and the reverse.

Consistency while ingestion runs: PostgreSQL is read with COPY inside one `REPEATABLE
READ` read-only transaction (one snapshot for every table; writers are never blocked);
SQLite is first copied with its online backup API in one step (a read transaction, which
in WAL mode does not block the writer), then dumped from that snapshot.

A restore verifies the manifest and every checksum before it touches the database, refuses
a non-empty database unless forced, and loads every table in one transaction: it either
completes or changes nothing.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from iiot.backup_format import KINDS, SERIALS, TABLES, decode, encode
from iiot.backup_manifest import (
    MANIFEST,
    BackupError,
    Manifest,
    TableEntry,
    open_table,
    read_manifest,
)
from iiot.errors import StorageUnavailable
from iiot.storage import open_store

__all__ = ["BackupError", "Manifest", "TableEntry", "backup", "read_manifest", "restore"]


def _telemetry_rows(columns: tuple[tuple[str, str], ...], existing: dict[str, set[str]]) -> str:
    """The telemetry to back up: every point but those of deleted devices still being purged."""
    names = ", ".join(c for c, _ in columns)
    if "telemetry_purges" not in existing:  # a schema from before migration 0008
        return f"SELECT {names} FROM telemetry"
    return (
        f"SELECT {names} FROM telemetry t WHERE NOT EXISTS"
        " (SELECT 1 FROM telemetry_purges p WHERE p.device_id = t.device_id)"
    )


# --- helpers ---------------------------------------------------------------------------
def _store_kind(url: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        return "sqlite"
    if scheme in ("postgresql", "postgres"):
        return "postgresql"
    raise BackupError(f"cannot back up {scheme!r} databases: expected sqlite or postgresql")


def _sqlite_path(url: str) -> Path:
    return Path(url[len("sqlite:///") :])


def _describe(url: str) -> str:
    """The database without its password, for messages."""
    if _store_kind(url) == "sqlite":
        return f"SQLite {_sqlite_path(url)}"
    parts = urlsplit(url)
    return f"PostgreSQL {parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _write_archive(path: Path, manifest: Manifest, folder: Path) -> None:
    """Write the tar next to `path`, fsync it, then rename it into place (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o600)  # password and token hashes inside
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
            data = manifest.to_json()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
            tar.addfile(info, io.BytesIO(data))
            for entry in manifest.tables.values():
                tar.add(folder / Path(entry.file).name, arcname=entry.file, recursive=False)
            tar.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- backup ----------------------------------------------------------------------------
async def backup(database_url: str, path: Path) -> Manifest:
    """Write a consistent backup of the database at `database_url` to the file `path`."""
    kind = _store_kind(database_url)
    path = Path(path)
    try:
        return await _backup(database_url, kind, path)
    except OSError as exc:  # disk full, permissions, a directory in the way
        raise BackupError(f"cannot write the backup {path}: {exc.strerror or exc}") from exc


async def _backup(database_url: str, kind: str, path: Path) -> Manifest:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".iiot-backup-", dir=path.parent) as tmp:
        folder = Path(tmp)
        if kind == "postgresql":
            schema, counts = await _dump_postgres(database_url, folder)
        else:
            schema, counts = await asyncio.to_thread(
                _dump_sqlite, _sqlite_path(database_url), folder
            )
        tables = {}
        for name, (columns, rows) in counts.items():
            data = folder / f"{name}.tsv.gz"
            tables[name] = TableEntry(
                file=f"data/{name}.tsv.gz",
                columns=columns,
                rows=rows,
                bytes=data.stat().st_size,
                sha256=await asyncio.to_thread(_sha256, data),
            )
        manifest = Manifest(store=kind, schema_version=schema, created_at=_now_iso(), tables=tables)
        await asyncio.to_thread(_write_archive, path, manifest, folder)
    return manifest


# What a dump returns: the schema version, and per table the columns written and row count.
_Dumped = tuple[int, dict[str, tuple[list[str], int]]]


def _present(existing: dict[str, set[str]]) -> Iterator[tuple[str, tuple[tuple[str, str], ...]]]:
    """The tables to dump, with their columns, as far as the database has them.

    A database whose schema predates a table or column (not yet upgraded by `iiot run`)
    is backed up without it; a restore then leaves it empty or at its default.
    """
    for name, columns in TABLES:
        if name in existing:
            yield name, tuple((c, k) for c, k in columns if c in existing[name])


async def _dump_postgres(url: str, folder: Path) -> _Dumped:
    import asyncpg

    from iiot.storage.postgres import PG_CURRENT_LATEST

    try:
        conn = await asyncpg.connect(url, timeout=10)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StorageUnavailable(f"cannot connect to {_describe(url)}: {exc}") from exc
    counts: dict[str, tuple[list[str], int]] = {}
    try:
        # One snapshot for every table: rows committed during the dump are not in it.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            schema = await _pg_schema_version(conn, url)
            await conn.execute("SET LOCAL bytea_output = 'hex'")  # the form restores read
            existing: dict[str, set[str]] = {}
            for row in await conn.fetch(
                "SELECT table_name, column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema()"
            ):
                existing.setdefault(row["table_name"], set()).add(row["column_name"])
            for name, columns in _present(existing):
                with gzip.open(folder / f"{name}.tsv.gz", "wb", compresslevel=1) as out:
                    if name == "telemetry_latest":
                        # The table may lag the stored points by one refresh: the values
                        # readers see, as every store restores them.
                        status = await conn.copy_from_query(
                            PG_CURRENT_LATEST, output=out, format="text"
                        )
                    elif name == "telemetry":
                        # Partitioned (migration 0008): COPY reads it through a query.
                        status = await conn.copy_from_query(
                            _telemetry_rows(columns, existing), output=out, format="text"
                        )
                    else:
                        status = await conn.copy_from_table(
                            name, output=out, columns=[c for c, _ in columns], format="text"
                        )
                counts[name] = ([c for c, _ in columns], int(status.split()[-1]))
    except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
        raise StorageUnavailable(f"{_describe(url)} became unavailable: {exc}") from exc
    finally:
        await conn.close()
    return schema, counts


async def _pg_schema_version(conn: Any, url: str) -> int:
    exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
    version = await conn.fetchval("SELECT max(version) FROM schema_version") if exists else None
    if version is None:
        raise BackupError(f"{_describe(url)} holds no iiot schema (has the platform run?)")
    return int(version)


def _sqlite_schema_version(conn: sqlite3.Connection, where: str) -> int:
    try:
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    except sqlite3.OperationalError:
        row = None
    if row is None or row[0] is None:
        raise BackupError(f"{where} holds no iiot schema (has the platform run?)")
    return int(row[0])


def _connect_sqlite(path: Path, *, create: bool = False) -> sqlite3.Connection:
    mode = "rwc" if create else "rw"
    if not create and not path.exists():
        raise BackupError(f"SQLite database {path} does not exist")
    try:
        conn = sqlite3.connect(f"file:{path}?mode={mode}", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise StorageUnavailable(f"cannot open SQLite database {path}: {exc}") from exc
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def _dump_sqlite(path: Path, folder: Path) -> _Dumped:
    snapshot_path = folder / "snapshot.db"
    source = _connect_sqlite(path)
    snapshot = sqlite3.connect(snapshot_path)
    try:
        # pages=-1 (all in one step): the copy is one read transaction, hence one
        # consistent state; in WAL mode the platform keeps writing meanwhile.
        source.backup(snapshot)
    except sqlite3.Error as exc:
        raise StorageUnavailable(f"SQLite backup of {path} failed: {exc}") from exc
    finally:
        source.close()
    counts: dict[str, tuple[list[str], int]] = {}
    try:
        schema = _sqlite_schema_version(snapshot, f"SQLite database {path}")
        existing = {
            name: {
                column
                for (column,) in snapshot.execute("SELECT name FROM pragma_table_info(?)", (name,))
            }
            for (name,) in snapshot.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")
        }
        for name, columns in _present(existing):
            names = ", ".join(c for c, _ in columns)
            kinds = [k for _, k in columns]
            rows = 0
            with gzip.open(
                folder / f"{name}.tsv.gz", "wt", compresslevel=1, encoding="utf-8", newline="\n"
            ) as out:
                select = (
                    _telemetry_rows(columns, existing)
                    if name == "telemetry"
                    else f"SELECT {names} FROM {name}"
                )
                for row in snapshot.execute(select):
                    out.write("\t".join(map(encode, row, kinds)) + "\n")
                    rows += 1
            counts[name] = ([c for c, _ in columns], rows)
    finally:
        snapshot.close()
        snapshot_path.unlink(missing_ok=True)
    return schema, counts


# --- restore ---------------------------------------------------------------------------
async def restore(database_url: str, path: Path, *, force: bool = False) -> Manifest:
    """Restore the backup file `path` into the database at `database_url`.

    Refuses (`BackupError`, nothing changed) a damaged or mismatched file, and a database
    that already holds data unless `force`, in which case its contents are replaced.
    """
    path = Path(path)
    kind = _store_kind(database_url)
    manifest = await asyncio.to_thread(read_manifest, path)
    # Opening the store creates or upgrades the schema, exactly as `iiot run` would.
    async with open_store(database_url):
        pass
    if kind == "postgresql":
        await _load_postgres(database_url, path, manifest, force)
    else:
        await asyncio.to_thread(_load_sqlite, _sqlite_path(database_url), path, manifest, force)
    return manifest


def _target_tables(present: set[str], manifest: Manifest, where: str) -> list[str]:
    """The backed-up tables the target has, in restore order.

    A table this version knows may be missing from a target whose schema (at the backup's
    version or later) never had it; a backup holding rows for such a table is refused.
    """
    lacking = sorted(name for name in manifest.tables if name not in present)
    if lacking:
        raise BackupError(f"{where} has no table {', '.join(lacking)} that the backup holds")
    return [name for name, _ in TABLES if name in present]


def _check_schema(manifest: Manifest, target: int, where: str) -> None:
    if manifest.schema_version > target:
        raise BackupError(
            f"the backup has schema version {manifest.schema_version} but {where} has "
            f"{target}: it was made by a newer iiot; upgrade iiot before restoring"
        )


def _refuse_non_empty(counts: dict[str, int], where: str) -> None:
    held = {name: n for name, n in counts.items() if n}
    if held:
        what = ", ".join(f"{name}" for name in held)
        raise BackupError(
            f"{where} is not empty (it holds {what}); restore refuses to overwrite it: "
            "restore into an empty database, or use --force to replace its contents"
        )


async def _load_postgres(url: str, path: Path, manifest: Manifest, force: bool) -> None:
    import asyncpg

    from iiot.storage.postgres import lock_out_writers

    where = _describe(url)
    try:
        conn = await asyncpg.connect(url, timeout=10)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StorageUnavailable(f"cannot connect to {where}: {exc}") from exc
    try:
        async with conn.transaction():
            _check_schema(manifest, await _pg_schema_version(conn, url), where)
            present = {
                row[0]
                for row in await conn.fetch(
                    "SELECT table_name FROM information_schema.tables"
                    " WHERE table_schema = current_schema()"
                )
            }
            tables = _target_tables(present, manifest, where)
            counts = {
                name: int(
                    await conn.fetchval(f"SELECT count(*) FROM (SELECT 1 FROM {name} LIMIT 1) AS x")
                )
                for name in tables
            }
            if not force:
                _refuse_non_empty(counts, where)
            else:
                await lock_out_writers(conn)  # a running platform must recheck its devices
                # CASCADE: any table outside the backup that refers to these is emptied
                # with them, as a restore into a new database would be.
                await conn.execute(f"TRUNCATE {', '.join(tables)} CASCADE")
                await conn.execute("TRUNCATE telemetry_purges")  # nothing left to purge
            for name in tables:
                entry = manifest.tables.get(name)
                if entry is None:
                    continue
                tar, data = open_table(path, entry)
                try:
                    status = await conn.copy_to_table(
                        name, source=data, columns=entry.columns, format="text"
                    )
                finally:
                    data.close()
                    tar.close()
                _check_count(name, int(status.split()[-1]), entry)
            # Deferred foreign keys (a device's gateway) are checked here, not at commit,
            # so that a violation is reported as a refused restore like any other.
            await conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
            await _continue_sequences(conn)
    except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError) as exc:
        raise StorageUnavailable(f"{where} became unavailable; nothing restored: {exc}") from exc
    except (asyncpg.PostgresError, gzip.BadGzipFile, EOFError, tarfile.TarError) as exc:
        raise BackupError(f"restore into {where} failed, nothing changed: {exc}") from exc
    finally:
        await conn.close()


async def _continue_sequences(conn: Any) -> None:
    """Make each serial column number new rows above the restored ones.

    Sequences are not transactional, so one is never moved back: should the restore
    fail after this, the rows it leaves in place still get fresh numbers.
    """
    for table, column in SERIALS.items():
        sequence = await conn.fetchval("SELECT pg_get_serial_sequence($1, $2)", table, column)
        top = await conn.fetchval(f"SELECT coalesce(max({column}), 0) FROM {table}")
        last = await conn.fetchval(f"SELECT last_value FROM {sequence}")
        await conn.execute("SELECT setval($1::regclass, $2)", sequence, max(top, last, 1))


def _check_count(name: str, loaded: int, entry: TableEntry) -> None:
    if loaded != entry.rows:
        raise BackupError(
            f"the backup's table {name} holds {loaded} rows, its manifest says {entry.rows}; "
            "nothing changed"
        )


def _load_sqlite(db_path: Path, path: Path, manifest: Manifest, force: bool) -> None:
    where = f"SQLite database {db_path}"
    conn = _connect_sqlite(db_path, create=True)
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        _check_schema(manifest, _sqlite_schema_version(conn, where), where)
        conn.execute("BEGIN IMMEDIATE")
        try:
            present = {
                name
                for (name,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")
            }
            tables = _target_tables(present, manifest, where)
            counts = {
                name: conn.execute(
                    f"SELECT count(*) FROM (SELECT 1 FROM {name} LIMIT 1)"
                ).fetchone()[0]
                for name in tables
            }
            if not force:
                _refuse_non_empty(counts, where)
            else:
                for name in reversed(tables):
                    conn.execute(f"DELETE FROM {name}")
                conn.execute("DELETE FROM telemetry_purges")  # nothing left to purge
            # AUTOINCREMENT columns (SERIALS) need nothing more: SQLite keeps numbering
            # above the largest value ever inserted, restored ones included.
            for name in tables:
                entry = manifest.tables.get(name)
                if entry is None:
                    continue
                kinds = [KINDS[name][c] for c in entry.columns]
                tar, data = open_table(path, entry)
                try:
                    cursor = conn.executemany(
                        f"INSERT INTO {name} ({', '.join(entry.columns)})"
                        f" VALUES ({', '.join('?' * len(kinds))})",
                        _rows(io.TextIOWrapper(data, encoding="utf-8", newline="\n"), kinds),
                    )
                finally:
                    data.close()
                    tar.close()
                _check_count(name, max(cursor.rowcount, 0), entry)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.OperationalError as exc:
        raise StorageUnavailable(f"{where} cannot be written now: {exc}") from exc
    except (sqlite3.Error, ValueError, gzip.BadGzipFile, EOFError, tarfile.TarError) as exc:
        raise BackupError(f"restore into {where} failed, nothing changed: {exc}") from exc
    finally:
        conn.close()


def _rows(lines: IO[str], kinds: list[str]) -> Iterator[tuple[Any, ...]]:
    for line in lines:
        fields = line.rstrip("\n").split("\t")
        if len(fields) != len(kinds):
            raise ValueError(f"a row has {len(fields)} fields, expected {len(kinds)}")
        yield tuple(map(decode, fields, kinds))
