"""Domain types that cross layers: tenants, users, devices, telemetry points."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from uuid import UUID

__all__ = [
    "AGGREGATES",
    "Device",
    "DevicePoints",
    "Point",
    "Role",
    "Scalar",
    "Tenant",
    "User",
]

# Values keep their JSON type: numbers, booleans and strings (anything else arrives as JSON text).
Scalar = float | int | bool | str

# Aggregate functions the telemetry query understands.
AGGREGATES = ("avg", "min", "max", "sum", "count")


class Role(enum.StrEnum):
    """What a user may do: everything, administer one tenant, or read one tenant."""

    SYSADMIN = "sysadmin"
    TENANT_ADMIN = "tenant_admin"
    TENANT_USER = "tenant_user"


@dataclass(frozen=True, slots=True)
class Tenant:
    """An organisation whose devices and users are isolated from every other tenant."""

    id: UUID
    name: str
    created_at: int  # Unix ms
    retention_days: int | None = None


@dataclass(frozen=True, slots=True)
class User:
    """A person or program that logs in; sysadmins have no tenant."""

    id: UUID
    username: str
    role: Role
    tenant_id: UUID | None
    password_hash: str = field(repr=False)
    created_at: int = 0
    token_version: int = 0  # bumped on a password or role change: older tokens stop working


@dataclass(frozen=True, slots=True)
class Device:
    """A PLC, sensor or gateway that sends telemetry with its access token."""

    id: UUID
    tenant_id: UUID
    name: str
    status: str
    created_at: int = 0
    type: str = "default"  # "gateway" for a ThingsBoard-style gateway; rules target types
    gateway_id: UUID | None = None  # the gateway that created and feeds this device, if any
    last_seen: int | None = None  # Unix ms of the last message of any kind
    connected: bool = False  # an MQTT connection, HTTP long poll or CoAP observation is open

    @property
    def is_gateway(self) -> bool:
        """Whether this device may create and feed child devices (ThingsBoard gateway API)."""
        return self.type == "gateway"

    def active(self, now_ms: int, inactivity_timeout_s: int) -> bool:
        """Whether the device was heard from within the inactivity timeout."""
        return self.last_seen is not None and now_ms - self.last_seen <= inactivity_timeout_s * 1000

    @property
    def disabled(self) -> bool:
        """Whether the platform refuses this device's data."""
        return self.status == "disabled"


@dataclass(frozen=True, slots=True)
class Point:
    """One telemetry value: key, Unix-ms timestamp and typed value."""

    key: str
    ts: int
    value: Scalar


@dataclass(frozen=True, slots=True)
class DevicePoints:
    """Points of one device, as handed from an adapter to the pipeline and the store."""

    device: Device
    points: tuple[Point, ...]
