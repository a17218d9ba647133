"""Request and response bodies of the REST API (pydantic models, shown in the OpenAPI schema).

Request bodies refuse unknown fields: a field such as `id`, `tenant_id` or `role` that a
route does not take is an error, never silently stored.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from iiot.model import Device, Role, Tenant, User
from iiot.security import MAX_PASSWORD_BYTES, MIN_PASSWORD_BYTES

__all__ = [
    "CertificateIn",
    "CertificateOut",
    "DeviceCreate",
    "DeviceOut",
    "DevicePage",
    "DevicePatch",
    "DeviceWithToken",
    "ErrorOut",
    "LoginIn",
    "StoredOut",
    "TenantCreate",
    "TenantOut",
    "TenantPage",
    "TenantPatch",
    "TokenOut",
    "TsValue",
    "UserCreate",
    "UserOut",
    "UserPage",
    "UserPatch",
    "clean_text",
]

MAX_RETENTION_DAYS = 36_500


def clean_text(value: str) -> str:
    """Refuse control characters and text that is not valid Unicode (lone surrogates)."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("must not contain control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    if value != value.strip():
        raise ValueError("must not start or end with spaces")
    return value


def _password(value: str) -> str:
    size = len(value.encode("utf-8", "surrogatepass"))
    if not MIN_PASSWORD_BYTES <= size <= MAX_PASSWORD_BYTES:
        raise ValueError(
            f"must be {MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES} bytes in UTF-8 (is {size})"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    return value


Name = Annotated[str, Field(min_length=1, max_length=255), AfterValidator(clean_text)]
Username = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$"),
]
Password = Annotated[
    str, Field(min_length=1, max_length=MAX_PASSWORD_BYTES), AfterValidator(_password)
]
Status = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(clean_text)]
RetentionDays = Annotated[int, Field(ge=1, le=MAX_RETENTION_DAYS)]

_IN = ConfigDict(extra="forbid")
DeviceType = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$"),
]


class ErrorOut(BaseModel):
    """Every error answer: a human-readable explanation."""

    detail: str


# --- auth ---------------------------------------------------------------------------------
class LoginIn(BaseModel):
    """Username and password."""

    model_config = _IN
    username: Annotated[str, Field(min_length=1, max_length=255)]
    password: Annotated[str, Field(min_length=1, max_length=1024)]


class TokenOut(BaseModel):
    """An access token to send as `Authorization: Bearer <access_token>`."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="seconds until the token expires")


# --- tenants ------------------------------------------------------------------------------
class TenantCreate(BaseModel):
    """A new tenant; `retention_days` null keeps telemetry forever."""

    model_config = _IN
    name: Name
    retention_days: RetentionDays | None = None


class TenantPatch(BaseModel):
    """Fields to change; `retention_days: null` means keep forever."""

    model_config = _IN
    name: Name | None = None
    retention_days: RetentionDays | None = None


class TenantOut(BaseModel):
    """A tenant."""

    id: UUID
    name: str
    retention_days: int | None
    created_at: int

    @classmethod
    def of(cls, tenant: Tenant) -> TenantOut:
        """From the domain type."""
        return cls(
            id=tenant.id,
            name=tenant.name,
            retention_days=tenant.retention_days,
            created_at=tenant.created_at,
        )


class TenantPage(BaseModel):
    """One page of tenants."""

    items: list[TenantOut]
    total: int


# --- users --------------------------------------------------------------------------------
class UserCreate(BaseModel):
    """A new user; `tenant_id` is the caller's own unless a sysadmin names one."""

    model_config = _IN
    username: Username
    password: Password
    role: Role = Role.TENANT_USER
    tenant_id: UUID | None = None


class UserPatch(BaseModel):
    """A new password and/or role."""

    model_config = _IN
    password: Password | None = None
    role: Role | None = None


class UserOut(BaseModel):
    """A user (never with a password or its hash)."""

    id: UUID
    username: str
    role: Role
    tenant_id: UUID | None
    created_at: int

    @classmethod
    def of(cls, user: User) -> UserOut:
        """From the domain type."""
        return cls(
            id=user.id,
            username=user.username,
            role=user.role,
            tenant_id=user.tenant_id,
            created_at=user.created_at,
        )


class UserPage(BaseModel):
    """One page of users."""

    items: list[UserOut]
    total: int


# --- devices ------------------------------------------------------------------------------
class DeviceCreate(BaseModel):
    """A new device; `tenant_id` is the caller's own unless a sysadmin names one."""

    model_config = _IN
    name: Name
    tenant_id: UUID | None = None
    type: DeviceType = "default"


class DevicePatch(BaseModel):
    """A new name, status (`disabled` refuses the device's data) and/or type."""

    model_config = _IN
    name: Name | None = None
    status: Status | None = None
    type: DeviceType | None = None


class DeviceOut(BaseModel):
    """A device (its token is never shown again after creation or rotation)."""

    id: UUID
    tenant_id: UUID
    name: str
    status: str
    created_at: int
    type: str = Field(description='what kind of device; "gateway" feeds child devices')
    gateway_id: UUID | None = Field(description="the gateway that feeds this device, if any")
    connected: bool = Field(
        description="an MQTT connection, HTTP long poll or CoAP observation is open"
    )
    last_seen: int | None = Field(description="Unix ms of the device's last message")
    active: bool = Field(description="heard from within IIOT_INACTIVITY_TIMEOUT_S")

    @classmethod
    def of(cls, device: Device, inactivity_timeout_s: int = 600) -> DeviceOut:
        """From the domain type (`active` as of now)."""
        now_ms = int(time.time() * 1000)
        return cls(
            id=device.id,
            tenant_id=device.tenant_id,
            name=device.name,
            status=device.status,
            created_at=device.created_at,
            type=device.type,
            gateway_id=device.gateway_id,
            connected=device.connected,
            last_seen=device.last_seen,
            active=device.active(now_ms, inactivity_timeout_s),
        )


class DeviceWithToken(DeviceOut):
    """A device with its new access token: shown only in this answer."""

    token: str

    @classmethod
    def with_token(
        cls, device: Device, token: str, inactivity_timeout_s: int = 600
    ) -> DeviceWithToken:
        """From the domain type and the clear token."""
        return cls(**DeviceOut.of(device, inactivity_timeout_s).model_dump(), token=token)


class CertificateIn(BaseModel):
    """A device's X.509 client certificate (PEM); only its SHA-256 fingerprint is kept."""

    model_config = _IN
    pem: str = Field(min_length=1, max_length=65_536)


class CertificateOut(BaseModel):
    """The registered certificate's fingerprint (hex SHA-256 of its DER form)."""

    device_id: UUID
    fingerprint: str


class DevicePage(BaseModel):
    """One page of devices."""

    items: list[DeviceOut]
    total: int


# --- telemetry ----------------------------------------------------------------------------
class TsValue(BaseModel):
    """One value at a Unix-ms timestamp (aggregates: the bucket's start)."""

    ts: int
    value: bool | int | float | str


class StoredOut(BaseModel):
    """How many points of the message were stored."""

    stored: int


def command_schema() -> dict[str, Any]:
    """OpenAPI schema of a command body: any JSON object."""
    return {
        "type": "object",
        "additionalProperties": True,
        "example": {"method": "setValve", "params": {"open": True}},
    }


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for error statuses, all shaped `{"detail": ...}`."""
    return {code: {"model": ErrorOut} for code in codes}


# The errors any management route may answer.
MANAGEMENT_ERRORS = error_responses(400, 401, 403, 404, 409, 413, 503)
