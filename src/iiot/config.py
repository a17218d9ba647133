"""Settings: the only reader of `IIOT_*` environment variables and the optional TOML file.

Every value is validated once, at start. A bad one raises `ConfigError` whose message is a
single line naming the variable, the value and what is expected.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from iiot.errors import ConfigError
from iiot.redact import redact_secrets

__all__ = ["Settings", "load_settings"]


@dataclass(frozen=True, slots=True)
class Settings:
    """Typed, validated platform settings (defaults are the embedded, zero-setup ones)."""

    data_dir: Path = Path("data")
    database_url: str = ""  # empty: SQLite file in the data dir
    bind_host: str = "0.0.0.0"
    http_port: int = 8080
    mqtt_url: str | None = None  # unset: embedded broker
    mqtt_port: int = 1883
    mqtts_port: int = 8883  # embedded endpoint over TLS; on when tls_cert and tls_key are set
    tls_cert: Path | None = None  # PEM server certificate (chain) for MQTTS
    tls_key: Path | None = None  # PEM private key of tls_cert
    # PEM CA certificates (or the devices' own self-signed ones) client certificates must
    # chain to; when set, MQTTS asks devices for a certificate (login by its fingerprint).
    tls_client_ca: Path | None = None
    mqtt_max_connections: int = 100_000  # embedded endpoint: connections held at once
    inactivity_timeout_s: int = 600  # a device not heard from for this long is inactive
    mqtt_shared_group: str | None = None  # `$share/{group}/...` on an external broker
    amqp_url: str | None = None  # unset: AMQP ingestion off
    amqp_prefetch: int = 1000
    coap_port: int = 5683
    opcua_port: int = 4840
    opcua_allow_none: bool = False
    admin_username: str = "admin"
    admin_password: str | None = None
    max_message_bytes: int = 256 * 1024
    max_points_per_message: int = 10_000
    batch_max_points: int = 5000
    batch_max_delay_ms: int = 0  # 0: group commit (see pipeline.py)
    batch_writers: int = 4  # batches written at once: the next is sent while one commits
    queue_max_points: int = 200_000
    commit_timeout_s: float = 30.0  # how long a device waits for its points to commit
    bcrypt_rounds: int = 12
    jwt_ttl_s: int = 3600
    login_attempts_per_minute: int = 10
    log_level: str = "INFO"
    retention_interval_s: int = 3600  # how often tenants' telemetry retention is applied
    http_reuse_port: bool = False  # set by `iiot run --workers N`: N processes share the port
    amqp_queue_type: str = "classic"  # `quorum`: replicated over a RabbitMQ cluster
    worker_index: int = 0  # set by `iiot run --role ingest --workers N`: 1..N, 0 alone
    database_read_url: str | None = None  # a PostgreSQL read replica for queries; unset: primary
    # One of several `iiot run` nodes on one PostgreSQL: live events and commands cross nodes.
    cluster: bool = False
    # At most one command in flight per device: the next goes once the previous is finished
    # (ThingsBoard's ACTORS_RPC_SEQUENTIAL). Every platform process must agree on it.
    commands_sequential: bool = False

    @property
    def effective_database_url(self) -> str:
        """The configured database URL, or the embedded SQLite file in the data dir."""
        return self.database_url or f"sqlite:///{self.data_dir / 'iiot.db'}"

    @property
    def uses_postgres(self) -> bool:
        """Whether the configured database is PostgreSQL."""
        return self.effective_database_url.startswith(("postgresql://", "postgres://"))


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw.strip())
        if not low <= value <= high:
            raise ValueError
        return value

    parse.__doc__ = f"an integer from {low} to {high}"
    return parse


def _port(raw: str) -> int:
    """a port number from 0 (off) to 65535"""
    return _int_between(0, 65535)(raw)


def _positive_float(raw: str) -> float:
    """a positive number of seconds"""
    value = float(raw)
    if not value > 0:
        raise ValueError
    return value


def _bool(raw: str) -> bool:
    """1/0, true/false, yes/no or on/off"""
    text = raw.strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError


def _text(raw: str) -> str:
    """a non-empty text"""
    if not raw.strip():
        raise ValueError
    return raw.strip()


def _optional_text(raw: str) -> str | None:
    """a text (empty for none)"""
    return raw.strip() or None


def _path(raw: str) -> Path:
    """a directory path"""
    return Path(_text(raw))


def _optional_path(raw: str) -> Path | None:
    """a file path (empty for none)"""
    return Path(raw.strip()) if raw.strip() else None


def _database_url(raw: str) -> str:
    """sqlite:///path or postgresql://user@host[:port]/db"""
    text = raw.strip()
    if not text:
        return ""
    parts = urlsplit(text)
    if parts.scheme == "sqlite" and parts.path:
        return text
    if parts.scheme in {"postgresql", "postgres"} and (parts.hostname or parts.path.strip("/")):
        return text
    raise ValueError


def _url(*schemes: str) -> Callable[[str], str | None]:
    def parse(raw: str) -> str | None:
        text = raw.strip()
        if not text:
            return None
        parts = urlsplit(text)
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError
        return text

    parse.__doc__ = " or ".join(f"{scheme}://[user:pass@]host[:port]" for scheme in schemes)
    return parse


def _queue_type(raw: str) -> str:
    """classic or quorum"""
    value = raw.strip().lower()
    if value not in ("classic", "quorum"):
        raise ValueError
    return value


def _log_level(raw: str) -> str:
    """one of DEBUG, INFO, WARNING, ERROR"""
    level = raw.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError
    return level


_PARSERS: dict[str, Callable[[str], Any]] = {
    "data_dir": _path,
    "database_url": _database_url,
    "bind_host": _text,
    "http_port": _port,
    "mqtt_url": _url("mqtt", "mqtts"),
    "mqtt_port": _port,
    "mqtts_port": _port,
    "tls_cert": _optional_path,
    "tls_key": _optional_path,
    "tls_client_ca": _optional_path,
    "mqtt_max_connections": _int_between(1, 10_000_000),
    "inactivity_timeout_s": _int_between(1, 365 * 24 * 3600),
    "mqtt_shared_group": _optional_text,
    "amqp_url": _url("amqp", "amqps"),
    "amqp_prefetch": _int_between(1, 65535),
    "coap_port": _port,
    "opcua_port": _port,
    "opcua_allow_none": _bool,
    "admin_username": _text,
    "admin_password": _optional_text,
    "max_message_bytes": _int_between(64, 64 * 1024 * 1024),
    "max_points_per_message": _int_between(1, 1_000_000),
    "batch_max_points": _int_between(1, 1_000_000),
    "batch_max_delay_ms": _int_between(0, 60_000),
    "batch_writers": _int_between(1, 16),
    "queue_max_points": _int_between(1, 100_000_000),
    "commit_timeout_s": _positive_float,
    "bcrypt_rounds": _int_between(4, 16),
    "jwt_ttl_s": _int_between(60, 30 * 24 * 3600),
    "login_attempts_per_minute": _int_between(1, 100_000),
    "log_level": _log_level,
    "retention_interval_s": _int_between(1, 7 * 24 * 3600),
    "http_reuse_port": _bool,
    "worker_index": _int_between(0, 1024),
    "amqp_queue_type": _queue_type,
    "database_read_url": _url("postgresql", "postgres"),
    "cluster": _bool,
    "commands_sequential": _bool,
}


def env_name(field_name: str) -> str:
    """The environment variable of a settings field, e.g. `http_port` -> `IIOT_HTTP_PORT`."""
    return f"IIOT_{field_name.upper()}"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read settings from `IIOT_CONFIG` (TOML, optional) overridden by `IIOT_*` variables."""
    env = os.environ if environ is None else environ
    raw: dict[str, tuple[str, str]] = {}  # field -> (source name, raw text)
    config_file = env.get("IIOT_CONFIG", "").strip()
    if config_file:
        raw.update(_read_toml(config_file))
    known = {f.name for f in fields(Settings)}
    for name in known:
        if env_name(name) in env:
            raw[name] = (env_name(name), env[env_name(name)])
    values: dict[str, Any] = {}
    for name, (source, text) in raw.items():
        parser = _PARSERS[name]
        try:
            values[name] = parser(text)
        except ValueError:
            raise ConfigError(
                f"{source}={redact_secrets(text)!r} is not valid: expected {parser.__doc__}"
            ) from None
    settings = Settings(**values)
    if settings.cluster and not settings.uses_postgres:
        raise ConfigError(
            "IIOT_CLUSTER=1 needs a PostgreSQL IIOT_DATABASE_URL (nodes share one database)"
        )
    return settings


def _read_toml(path: str) -> dict[str, tuple[str, str]]:
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"IIOT_CONFIG={path!r} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"IIOT_CONFIG={path!r} is not valid TOML: {exc}") from None
    known = {f.name for f in fields(Settings)}
    result: dict[str, tuple[str, str]] = {}
    for key, value in document.items():
        if key not in known:
            raise ConfigError(
                f"IIOT_CONFIG={path!r}: unknown setting {key!r}; expected one of "
                + ", ".join(sorted(known))
            )
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if key == "data_dir" and text.strip() and not Path(text.strip()).is_absolute():
            # Relative to the file, so every command finds the same data from any directory.
            text = str(Path(path).absolute().parent / text.strip())
        result[key] = (f"{key} in {path}", text)
    return result
