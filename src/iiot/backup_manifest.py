"""The backup file's manifest: what a backup holds, read and verified before a restore.

The manifest (`manifest.json`, the archive's first member) names the format and its
version, the source store and schema version, and per table its columns, row count and
the SHA-256 and size of its data member. `read_manifest` checks every member against it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from iiot import __version__
from iiot.backup_format import KINDS
from iiot.errors import IIoTError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "BackupError",
    "Manifest",
    "TableEntry",
    "open_table",
    "read_manifest",
]

FORMAT = "iiot-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BackupError(IIoTError):
    """A backup cannot be made, or a file is damaged, mismatched or refused by the target."""


@dataclass(frozen=True, slots=True)
class TableEntry:
    """One table in a backup: its data member, columns, row count and checksum."""

    file: str
    columns: list[str]
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a backup holds, read before anything is restored."""

    store: str  # "sqlite" or "postgresql"
    schema_version: int
    created_at: str  # ISO 8601, UTC
    iiot_version: str = __version__
    tables: dict[str, TableEntry] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def rows(self, table: str) -> int:
        """Rows of one table in the backup (0 if absent)."""
        entry = self.tables.get(table)
        return entry.rows if entry else 0

    def summary(self) -> str:
        """One line for operators: counts per kind of object."""
        return (
            f"{self.rows('tenants')} tenants, {self.rows('users')} users, "
            f"{self.rows('devices')} devices, {self.rows('telemetry')} points, "
            f"{self.rows('commands')} commands, {self.rows('alarm_rules')} alarm rules, "
            f"{self.rows('alarms')} alarms, {self.rows('webhooks')} webhooks "
            f"({self.store}, schema {self.schema_version}, made {self.created_at})"
        )

    def to_json(self) -> bytes:
        """The manifest as pretty JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse and validate a manifest; `BackupError` says what is wrong."""
        try:
            raw = json.loads(data)
            if raw.get("format") != FORMAT:
                raise BackupError(f"not an iiot backup (format {raw.get('format')!r})")
            if raw.get("format_version") != FORMAT_VERSION:
                raise BackupError(
                    f"backup format version {raw.get('format_version')!r} is not supported "
                    f"by iiot {__version__} (it reads version {FORMAT_VERSION})"
                )
            tables = {name: TableEntry(**entry) for name, entry in raw["tables"].items()}
            return cls(
                store=str(raw["store"]),
                schema_version=int(raw["schema_version"]),
                created_at=str(raw["created_at"]),
                iiot_version=str(raw["iiot_version"]),
                tables=tables,
            )
        except BackupError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BackupError(f"the backup's manifest is damaged: {exc}") from None


def read_manifest(path: Path) -> Manifest:
    """Read a backup's manifest and verify every data member's size and checksum."""
    path = Path(path)
    if not path.is_file():
        raise BackupError(f"backup file {path} does not exist")
    try:
        with tarfile.open(path, mode="r:") as tar:
            member = tar.next()
            if member is None or member.name != MANIFEST:
                raise BackupError(f"{path} is not an iiot backup (no {MANIFEST} first)")
            manifest = Manifest.from_json(_read_member(tar, member))
            _check_tables(manifest)
            seen: set[str] = set()
            for member in tar:
                entry = next((e for e in manifest.tables.values() if e.file == member.name), None)
                if entry is None:
                    continue
                digest = hashlib.sha256()
                size = 0
                handle = tar.extractfile(member)
                if handle is None:
                    raise BackupError(f"{path}: {member.name} is not a file")
                for chunk in iter(lambda h=handle: h.read(1 << 20), b""):  # type: ignore[misc]
                    digest.update(chunk)
                    size += len(chunk)
                if size != entry.bytes or digest.hexdigest() != entry.sha256:
                    raise BackupError(
                        f"{path} is damaged: {member.name} does not match its checksum "
                        "in the manifest; nothing was restored"
                    )
                seen.add(member.name)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BackupError(f"{path} is damaged or not a backup: {exc}") from None
    missing = sorted(e.file for e in manifest.tables.values() if e.file not in seen)
    if missing:
        raise BackupError(f"{path} is damaged: missing {', '.join(missing)}")
    return manifest


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:
        raise BackupError(f"{member.name} is not a file")
    return handle.read()


def _check_tables(manifest: Manifest) -> None:
    for name, entry in manifest.tables.items():
        if name not in KINDS:
            raise BackupError(f"the backup holds an unknown table {name!r}")
        unknown = [c for c in entry.columns if c not in KINDS[name]]
        if unknown:
            raise BackupError(f"the backup's table {name} has unknown columns {unknown}")


def open_table(path: Path, entry: TableEntry) -> tuple[tarfile.TarFile, gzip.GzipFile]:
    """The decompressed data of one table, read from the archive (caller closes both)."""
    tar = tarfile.open(path, mode="r:")  # noqa: SIM115 - handed to the caller, who closes it
    try:
        member = tar.getmember(entry.file)
        handle = tar.extractfile(member)
        if handle is None:
            raise BackupError(f"{path}: {entry.file} is not a file")
        return tar, gzip.GzipFile(fileobj=handle, mode="rb")
    except BaseException:
        tar.close()
        raise
