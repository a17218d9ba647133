"""What a backup holds: the tables in restore order with their column kinds, and the
COPY text form of their values.

Tables left out on purpose (nothing a user would want back, or rebuilt by the platform):
- `telemetry_purges`: the queue of deleted devices whose points are still being purged
  (their points are left out of the backup instead);
- `live_changes` (SQLite): the feed of changes made by `iiot` commands for a running
  platform, kept for an hour;
- `schema_version` and the `device_deletions` sequence: bookkeeping of the database itself.
"""

from __future__ import annotations

import re
from typing import Any
from uuid import UUID

__all__ = ["KINDS", "SERIALS", "TABLES", "decode", "encode"]

_TELEMETRY = (
    ("device_id", "uuid"),
    ("key", "text"),
    ("ts", "int"),
    ("num_value", "float"),
    ("int_value", "int"),
    ("bool_value", "bool"),
    ("str_value", "text"),
)

# (table, ((column, kind), ...)) in restore order: parents before children, so that every
# foreign key holds as soon as a row is loaded (devices.gateway_id, a device referring to
# another device, is checked at commit). Kinds say how a SQLite value maps to the COPY text
# form: uuid (16-byte blob), text, json (text holding JSON; jsonb on PostgreSQL), int,
# float, bool, bytes (blob; bytea on PostgreSQL).
TABLES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    (
        "tenants",
        (("id", "uuid"), ("name", "text"), ("created_at", "int"), ("retention_days", "int")),
    ),
    (
        "users",
        (
            ("id", "uuid"),
            ("username", "text"),
            ("password_hash", "text"),
            ("role", "text"),
            ("tenant_id", "uuid"),
            ("created_at", "int"),
            ("token_version", "int"),
        ),
    ),
    (
        "devices",
        (
            ("id", "uuid"),
            ("tenant_id", "uuid"),
            ("name", "text"),
            ("status", "text"),
            ("token_hash", "text"),
            ("created_at", "int"),
            ("type", "text"),
            ("gateway_id", "uuid"),
            ("last_seen", "int"),
            ("connected", "bool"),
            ("cert_fingerprint", "text"),
        ),
    ),
    ("telemetry", _TELEMETRY),
    ("telemetry_latest", _TELEMETRY),
    (
        "commands",
        (
            ("id", "uuid"),
            ("tenant_id", "uuid"),
            ("device_id", "uuid"),
            ("method", "text"),
            ("params", "json"),
            ("oneway", "bool"),
            ("persistent", "bool"),
            ("timeout_ms", "int"),
            ("expires_at", "int"),
            ("retries", "int"),
            ("attempts", "int"),
            ("status", "text"),
            ("response", "json"),
            ("error", "text"),
            ("sent_by", "uuid"),
            ("deadline", "int"),
            ("created_at", "int"),
            ("updated_at", "int"),
        ),
    ),
    (
        "command_transitions",
        (("command_id", "uuid"), ("seq", "int"), ("status", "text"), ("ts", "int")),
    ),
    (
        "device_attributes",
        (
            ("device_id", "uuid"),
            ("scope", "text"),
            ("key", "text"),
            ("value", "json"),
            ("ts", "int"),
        ),
    ),
    # Persistent MQTT sessions (migration 0010): a device that reconnects without a clean
    # start keeps its subscriptions, also after a move to another database.
    (
        "mqtt_sessions",
        (
            ("client_id", "text"),
            ("device_id", "uuid"),
            ("subscriptions", "json"),
            ("updated_at", "int"),
        ),
    ),
    (
        "alarm_rules",
        (
            ("id", "uuid"),
            ("tenant_id", "uuid"),
            ("name", "text"),
            ("spec", "json"),
            ("created_at", "int"),
            ("updated_at", "int"),
        ),
    ),
    (
        "alarm_rule_state",
        (("rule_id", "uuid"), ("device_id", "uuid"), ("state", "json"), ("updated_at", "int")),
    ),
    (
        "alarms",
        (
            ("id", "uuid"),
            ("tenant_id", "uuid"),
            ("device_id", "uuid"),
            ("type", "text"),
            ("severity", "text"),
            ("severity_rank", "int"),
            ("acknowledged", "bool"),
            ("cleared", "bool"),
            ("start_ts", "int"),
            ("end_ts", "int"),
            ("ack_ts", "int"),
            ("ack_by", "text"),
            ("clear_ts", "int"),
            ("value", "json"),
            ("rule_id", "uuid"),
            ("details", "json"),
        ),
    ),
    (
        "webhooks",
        (
            ("id", "uuid"),
            ("tenant_id", "uuid"),
            ("url", "text"),
            ("secret", "text"),
            ("events", "text"),
            ("created_at", "int"),
        ),
    ),
    (
        "webhook_outbox",
        (
            ("id", "int"),
            ("webhook_id", "uuid"),
            ("event", "text"),
            ("event_id", "text"),
            ("body", "bytes"),
            ("created_at", "int"),
            ("next_attempt_at", "int"),
            ("attempts", "int"),
            ("done_at", "int"),
        ),
    ),
    (
        "webhook_deliveries",
        (
            ("id", "int"),
            ("webhook_id", "uuid"),
            ("event", "text"),
            ("event_id", "text"),
            ("attempt", "int"),
            ("ts", "int"),
            ("status_code", "int"),
            ("error", "text"),
            ("duration_ms", "int"),
            ("outcome", "text"),
        ),
    ),
)
KINDS = {name: dict(columns) for name, columns in TABLES}

# Columns numbered by the database (PostgreSQL bigserial, SQLite AUTOINCREMENT): restored
# with their values, after which the numbering must continue above them.
SERIALS = {"command_transitions": "seq", "webhook_outbox": "id", "webhook_deliveries": "id"}


# --- COPY text format ------------------------------------------------------------------
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_ESCAPE_RE = re.compile(r"[\\\t\n\r]")
_UNESCAPE_RE = re.compile(r"\\(x[0-9a-fA-F]{1,2}|[0-7]{1,3}|.)")
_UNESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _escape(text: str) -> str:
    return _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group()], text)


def _unescape_one(match: re.Match[str]) -> str:
    code = match.group(1)
    if code[0] == "x" and len(code) > 1:
        return chr(int(code[1:], 16))
    if code[0] in "01234567":
        return chr(int(code, 8))
    return _UNESCAPES.get(code, code)


def _unescape(text: str) -> str:
    return _UNESCAPE_RE.sub(_unescape_one, text) if "\\" in text else text


def encode(value: Any, kind: str) -> str:
    """A SQLite value as a COPY text field."""
    if value is None:
        return "\\N"
    if kind == "uuid":
        return str(UUID(bytes=value))
    if kind == "bool":
        return "t" if value else "f"
    if kind == "int":
        return str(int(value))
    if kind == "float":
        return repr(float(value))  # shortest text that reads back to the same double
    if kind == "bytes":
        # bytea's hex form (`\x...`), its backslash escaped as COPY text wants.
        data = value.encode() if isinstance(value, str) else bytes(value)
        return "\\\\x" + data.hex()
    return _escape(str(value))


def decode(text: str, kind: str) -> Any:
    """A COPY text field as a SQLite value."""
    if text == "\\N":
        return None
    if kind == "uuid":
        return UUID(text).bytes
    if kind == "bool":
        return 1 if text == "t" else 0
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    if kind == "bytes":
        hex_form = _unescape(text)
        if not hex_form.startswith("\\x"):
            raise ValueError("a bytes field is not in bytea's hex form")
        return bytes.fromhex(hex_form[2:])
    return _unescape(text)
