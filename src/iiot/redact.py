"""Secrets kept out of logs and error messages: URL passwords and device tokens in paths."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact_path", "redact_secrets", "redact_url"]

# `/api/v1/{token}/...`: the device API carries its credential in the path (ThingsBoard's
# convention), so any logged path or URI must lose it first.
_DEVICE_PATH = re.compile(r"(/api/v1/)[^/?#\s]+")
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^@/\s]*@")


def redact_path(path: str) -> str:
    """The path with a device token replaced by `***` (e.g. `/api/v1/***/telemetry`)."""
    return _DEVICE_PATH.sub(r"\1***", path)


def redact_url(url: str) -> str:
    """The URL with its password (if any) replaced by `***`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _URL_PASSWORD.sub(r"\1:***@", url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def redact_secrets(text: str) -> str:
    """Any free text with URL passwords and device-path tokens removed."""
    return redact_path(_URL_PASSWORD.sub(r"\1:***@", text))
