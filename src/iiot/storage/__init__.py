"""Persistent storage: the `Store` interface and `open_store`, which picks SQLite or PostgreSQL."""

from __future__ import annotations

from urllib.parse import urlsplit

from iiot.errors import ConfigError
from iiot.storage.base import Page, Scope, Store, TelemetryQuery

__all__ = ["Page", "Scope", "Store", "TelemetryQuery", "open_store"]


def open_store(url: str, *, read_url: str | None = None, batch_writers: int = 4) -> Store:
    """The store for `sqlite:///path` or `postgresql://...` (not yet entered: use `async with`).

    `read_url`, PostgreSQL only, is a read replica that answers queries (telemetry, latest
    values, lists); unset, the primary answers them on connections of their own.
    `batch_writers`: the pipeline's writers, each with a PostgreSQL connection of its own.
    """
    scheme = urlsplit(url).scheme
    if read_url and scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            "IIOT_DATABASE_READ_URL is set, but a read replica needs a PostgreSQL"
            " IIOT_DATABASE_URL (SQLite reads have their own connection already)"
        )
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

        return PostgresStore(url, read_url=read_url, ingest_connections=batch_writers)
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
