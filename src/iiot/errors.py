"""One error tree: the type of an error tells the caller what to do with it."""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "Conflict",
    "DeviceDisabled",
    "IIoTError",
    "InvalidPayload",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "StorageUnavailable",
]


class IIoTError(Exception):
    """Base of every error the platform raises on purpose."""


class ConfigError(IIoTError):
    """A setting is missing or wrong; the message names the variable, value and expectation."""


class InvalidPayload(IIoTError):
    """A telemetry message is malformed or breaks a limit; nothing of it is stored."""


class PayloadTooLarge(InvalidPayload):
    """A telemetry message exceeds the configured size limit."""


class InvalidRequest(IIoTError):
    """A management request has bad parameters (query range, body fields)."""


class AuthenticationError(IIoTError):
    """Credentials (device token, password, JWT) are unknown or wrong."""


class PermissionDenied(IIoTError):
    """The caller is known but may not do this."""


class DeviceDisabled(PermissionDenied):
    """The device's status is `disabled`, so its data is refused."""


class NotFound(IIoTError):
    """The object does not exist, or belongs to another tenant (indistinguishable on purpose)."""


class Conflict(IIoTError):
    """The object would break a uniqueness rule (a name already taken)."""


class StorageUnavailable(IIoTError):
    """The database cannot be reached now; retry later, nothing accepted is lost."""
