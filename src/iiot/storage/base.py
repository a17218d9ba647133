"""The `Store` interface: every implementation (SQLite, PostgreSQL) passes one contract suite.

Every method that reads or changes tenant data takes the tenant scope first. A scope of
`None` means "all tenants" and is only passed for system administrators; tenant filtering
happens here, in storage, never in route handlers. An object outside the scope raises
`NotFound`, exactly as a missing one does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Literal, Protocol, Self, TypeVar
from uuid import UUID

from iiot.model import Device, DevicePoints, Point, Role, Scalar, Tenant, User

if TYPE_CHECKING:
    from iiot.storage.control import ControlStore

__all__ = ["DeviceFilter", "Page", "Scope", "Store", "TelemetryQuery"]

Scope = UUID | None
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list and the total number of matching rows."""

    items: list[T]
    total: int


@dataclass(frozen=True, slots=True)
class TelemetryQuery:
    """A telemetry read: raw points, or one aggregate per key and interval bucket."""

    start: int  # Unix ms, inclusive
    end: int  # Unix ms, exclusive
    keys: tuple[str, ...] | None = None  # None: every key of the device
    limit: int = 1000  # per key
    order: Literal["asc", "desc"] = "asc"
    agg: Literal["none", "avg", "min", "max", "sum", "count"] = "none"
    interval_ms: int = 0  # bucket width when agg != "none"; buckets start at multiples of it
    # At most this many points in the answer (keys x limit, or x buckets for aggregates);
    # None: no cap. A query that could return more is refused with `InvalidRequest`.
    max_points: int | None = None


@dataclass(frozen=True, slots=True)
class DeviceFilter:
    """Which devices a list holds (every field optional; all given ones must match)."""

    search: str | None = None  # part of the name, any case
    type: str | None = None
    status: str | None = None
    connected: bool | None = None
    seen_since: int | None = None  # active: last_seen at or after this Unix ms
    not_seen_since: int | None = None  # inactive: never seen, or last seen before this
    gateway_id: UUID | None = None  # children of this gateway


class Store(Protocol):
    """Persistent storage of tenants, users, devices and telemetry."""

    @property
    def control(self) -> ControlStore:
        """Commands and attributes (`storage/control.py`)."""
        ...

    async def __aenter__(self) -> Self:
        """Connect and apply schema migrations."""
        ...

    async def __aexit__(self, *exc: object) -> None:
        """Close every connection."""
        ...

    async def ping(self) -> None:
        """Raise `StorageUnavailable` when the database cannot answer now."""
        ...

    # --- tenants -----------------------------------------------------------------------
    async def create_tenant(self, name: str) -> Tenant:
        """Create a tenant; `Conflict` if the name is taken."""
        ...

    async def get_tenant(self, scope: Scope, tenant_id: UUID) -> Tenant:
        """One tenant visible in the scope."""
        ...

    async def list_tenants(self, scope: Scope, limit: int, offset: int) -> Page[Tenant]:
        """Tenants visible in the scope, by name."""
        ...

    async def update_tenant(
        self,
        scope: Scope,
        tenant_id: UUID,
        *,
        name: str | None = None,
        retention_days: int | None = None,
        clear_retention: bool = False,
    ) -> Tenant:
        """Rename a tenant or change its telemetry retention."""
        ...

    async def delete_tenant(self, scope: Scope, tenant_id: UUID) -> None:
        """Delete a tenant with its users, devices and telemetry."""
        ...

    # --- users -------------------------------------------------------------------------
    async def create_user(
        self, tenant_id: UUID | None, username: str, password_hash: str, role: Role
    ) -> User:
        """Create a user; usernames are unique across the platform (`Conflict`)."""
        ...

    async def get_user(self, scope: Scope, user_id: UUID) -> User:
        """One user visible in the scope."""
        ...

    async def find_user(self, username: str) -> User | None:
        """The user with this username, for login (not scoped)."""
        ...

    async def count_users(self) -> int:
        """How many users exist (to create the first administrator)."""
        ...

    async def list_users(self, scope: Scope, limit: int, offset: int) -> Page[User]:
        """Users visible in the scope, by username."""
        ...

    async def update_user(
        self,
        scope: Scope,
        user_id: UUID,
        *,
        password_hash: str | None = None,
        role: Role | None = None,
    ) -> User:
        """Change a user's password hash or role."""
        ...

    async def delete_user(self, scope: Scope, user_id: UUID) -> None:
        """Delete a user."""
        ...

    # --- devices -----------------------------------------------------------------------
    async def create_device(
        self,
        tenant_id: UUID,
        name: str,
        token_hash: str,
        *,
        type: str = "default",
        gateway_id: UUID | None = None,
    ) -> Device:
        """Create an `active` device; `Conflict` if the name is taken in the tenant."""
        ...

    async def find_device_by_name(self, tenant_id: UUID, name: str) -> Device | None:
        """The tenant's device of this name (a gateway's children are found by name)."""
        ...

    async def find_device_by_certificate(self, fingerprint: str) -> Device | None:
        """The device whose registered client certificate has this SHA-256 fingerprint."""
        ...

    async def set_device_certificate(
        self, scope: Scope, device_id: UUID, fingerprint: str | None
    ) -> Device:
        """Register (or, with None, remove) a device's client certificate fingerprint."""
        ...

    async def record_presence(
        self, last_seen: Mapping[UUID, int], connected: Mapping[UUID, bool]
    ) -> None:
        """Batched presence: last message times (never moved back) and connection states."""
        ...

    async def get_device(self, scope: Scope, device_id: UUID) -> Device:
        """One device visible in the scope."""
        ...

    async def find_device_by_token_hash(self, token_hash: str) -> Device | None:
        """The device whose token hashes to this value (not scoped: the token is the proof)."""
        ...

    async def list_devices(
        self, scope: Scope, limit: int, offset: int, filters: DeviceFilter | None = None
    ) -> Page[Device]:
        """Devices visible in the scope (and matching the filter), by name."""
        ...

    async def update_device(
        self,
        scope: Scope,
        device_id: UUID,
        *,
        name: str | None = None,
        status: str | None = None,
        type: str | None = None,
    ) -> Device:
        """Rename a device, change its status or its type."""
        ...

    async def set_device_token_hash(self, scope: Scope, device_id: UUID, token_hash: str) -> None:
        """Replace a device's token hash (rotation)."""
        ...

    async def delete_device(self, scope: Scope, device_id: UUID) -> None:
        """Delete a device and its telemetry."""
        ...

    # --- telemetry ---------------------------------------------------------------------
    async def write_points(self, batch: Sequence[DevicePoints]) -> None:
        """Store points in one transaction and update latest values.

        Idempotent: a (device, key, ts) already stored keeps one row (the newer value wins).
        Raises `StorageUnavailable` when the database cannot be reached; then nothing of the
        batch is committed and the caller may retry it whole.
        """
        ...

    async def query_telemetry(
        self, scope: Scope, device_id: UUID, query: TelemetryQuery
    ) -> dict[str, list[tuple[int, Scalar]]]:
        """Raw points or aggregates per key, as (ts, value) pairs ordered by ts."""
        ...

    async def latest(
        self, scope: Scope, device_id: UUID, keys: Sequence[str] | None = None
    ) -> dict[str, Point]:
        """The newest point (largest ts) of each key of a device."""
        ...

    # --- MQTT sessions (the embedded endpoint's persistent sessions) -----------------
    async def get_mqtt_session(
        self, scope: Scope, client_id: str
    ) -> tuple[UUID, dict[str, int]] | None:
        """(device id, subscriptions: topic filter -> QoS) of a saved session, or None."""
        ...

    async def save_mqtt_session(
        self, scope: Scope, client_id: str, device_id: UUID, subscriptions: dict[str, int]
    ) -> None:
        """Create or replace a persistent session's subscriptions."""
        ...

    async def delete_mqtt_session(self, scope: Scope, client_id: str) -> None:
        """Forget a session (no error when there is none)."""
        ...

    async def delete_mqtt_sessions(self, sessions: Sequence[tuple[Scope, str]]) -> None:
        """Forget several sessions, each (scope, client id), in one statement."""
        ...

    async def delete_telemetry_before(self, tenant_id: UUID, before_ts: int) -> int:
        """Delete a tenant's raw telemetry older than `before_ts`; returns rows removed."""
        ...
