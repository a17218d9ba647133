"""Persistent storage: the `Store` interface and `open_store`, which picks SQLite or PostgreSQL."""

from __future__ import annotations

from urllib.parse import urlsplit

from iiot.errors import ConfigError
from iiot.storage.base import Page, Scope, Store, TelemetryQuery

__all__ = ["Page", "Scope", "Store", "TelemetryQuery", "open_store"]


def open_store(url: str) -> Store:
    """The store for `sqlite:///path` or `postgresql://...` (not yet entered: use `async with`)."""
    scheme = urlsplit(url).scheme
    # Imported lazily: an SQLite deployment never loads asyncpg, and the reverse.
    if scheme == "sqlite":
        # sqlite:///relative/file.db and sqlite:////absolute/file.db (SQLAlchemy's convention).
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigError(
                f"IIOT_DATABASE_URL={url!r} is not valid: expected sqlite:///path/to/file.db"
            )
        from iiot.storage.sqlite import SqliteStore

        return SqliteStore(path)
    if scheme in ("postgresql", "postgres"):
        from iiot.storage.postgres import PostgresStore

        return PostgresStore(url)
    raise ConfigError(
        f"IIOT_DATABASE_URL={_redact(url)!r} is not valid: "
        "expected sqlite:///path or postgresql://user@host[:port]/db"
    )


def _redact(url: str) -> str:
    """The URL without its password, so that it can be shown in a message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
