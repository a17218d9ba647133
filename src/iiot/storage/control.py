"""Storage interface for device control: commands with their state history, attributes.

Kept apart from `Store` so the two dialects' implementations (`control_pg`,
`control_sqlite`) stay small; each store exposes one as `store.control`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

from iiot.storage.base import Page, Scope

__all__ = [
    "ATTRIBUTE_SCOPES",
    "FINAL_STATES",
    "OPEN_STATES",
    "STATES",
    "UNSET",
    "Answered",
    "AttributeValue",
    "Claimed",
    "Command",
    "ControlStore",
    "NewCommand",
    "in_flight_sql",
]

STATES = (
    "QUEUED",
    "SENT",
    "DELIVERED",
    "SUCCESSFUL",
    "TIMEOUT",
    "EXPIRED",
    "FAILED",
    "CANCELED",
)
OPEN_STATES = ("QUEUED", "SENT", "DELIVERED", "TIMEOUT")
FINAL_STATES = ("SUCCESSFUL", "EXPIRED", "FAILED", "CANCELED")
ATTRIBUTE_SCOPES = ("client", "shared", "server")


# A command is in flight while the device may still be working on it: SENT, DELIVERED
# two-way, or TIMEOUT with a retry due (its deadline says when it is queued again). With
# `IIOT_COMMANDS_SEQUENTIAL` a device's next command waits until none is.
def in_flight_sql(alias: str) -> str:
    """The in-flight condition on the `commands` row `alias`, the same in both dialects."""
    return (
        f"({alias}.status = 'SENT' OR ({alias}.status = 'DELIVERED' AND NOT {alias}.oneway)"
        f" OR ({alias}.status = 'TIMEOUT' AND {alias}.deadline IS NOT NULL))"
    )


class _Unset:
    """Marks an argument that was not given (None is a valid JSON answer)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


@dataclass(frozen=True, slots=True)
class NewCommand:
    """What a sender asks for; the service fills in defaults before storing it."""

    tenant_id: UUID
    device_id: UUID
    method: str
    params: Any
    oneway: bool
    persistent: bool
    timeout_ms: int
    expires_at: int
    retries: int
    sent_by: UUID | None


@dataclass(frozen=True, slots=True)
class Command:
    """A stored command and, when loaded, every state it went through."""

    id: UUID
    tenant_id: UUID
    device_id: UUID
    method: str
    params: Any
    oneway: bool
    persistent: bool
    timeout_ms: int
    expires_at: int
    retries: int
    attempts: int
    status: str
    response: Any
    error: str | None
    sent_by: UUID | None
    deadline: int | None
    created_at: int
    updated_at: int
    transitions: list[tuple[str, int]] = field(default_factory=list)

    @property
    def final(self) -> bool:
        """Whether nothing will change this command any more."""
        return self.status in FINAL_STATES or (self.status == "DELIVERED" and self.oneway)

    @property
    def in_flight(self) -> bool:
        """Whether the device may still be working on it (`in_flight_sql` in Python)."""
        if self.status == "DELIVERED":
            return not self.oneway
        if self.status == "TIMEOUT":
            return self.deadline is not None
        return self.status == "SENT"

    def rest(self) -> dict[str, Any]:
        """The REST representation (also the data of its live events)."""
        return {
            "id": str(self.id),
            "device_id": str(self.device_id),
            "method": self.method,
            "params": self.params,
            "oneway": self.oneway,
            "persistent": self.persistent,
            "timeout_ms": self.timeout_ms,
            "expires_at": self.expires_at,
            "retries": self.retries,
            "attempts": self.attempts,
            "status": self.status,
            "response": self.response,
            "error": self.error,
            "sent_by": None if self.sent_by is None else str(self.sent_by),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "transitions": [{"status": s, "ts": ts} for s, ts in self.transitions],
        }


@dataclass(frozen=True, slots=True)
class Claimed:
    """A command just moved from QUEUED to SENT for delivery."""

    command: Command
    # Another unexpired command of the device is QUEUED behind it (when claims race, it may
    # also be one another claim has just taken: a hint to claim again, not a promise).
    more: bool


@dataclass(frozen=True, slots=True)
class Answered:
    """A command the device's answer made SUCCESSFUL."""

    command: Command
    # It was SENT: the answer overtook the receipt, so DELIVERED was recorded with it.
    delivered_now: bool


@dataclass(frozen=True, slots=True)
class AttributeValue:
    """One attribute's JSON value and when it was last set (Unix ms)."""

    value: Any
    ts: int


class ControlStore(Protocol):
    """Commands and attributes; every method takes the tenant scope first."""

    async def create_command(
        self, scope: Scope, command: NewCommand, now: int, *, claim: bool = False
    ) -> Command:
        """Store a QUEUED command (its first transition too); `NotFound` if the device isn't
        visible in the scope. `claim`: a sender that holds a link to the device takes the
        command as it is stored: SENT (attempt 1, both transitions, the delivery deadline
        set as `claim_next_command` sets it), unless another unexpired QUEUED command of the
        device is ahead of it (creation order), in which case it is QUEUED as usual."""
        ...

    async def get_command(self, scope: Scope, command_id: UUID) -> Command:
        """One command with its transitions."""
        ...

    async def list_commands(
        self, scope: Scope, device_id: UUID, status: str | None, limit: int, offset: int
    ) -> Page[Command]:
        """A device's commands, newest first."""
        ...

    async def transition_command(
        self,
        scope: Scope,
        command_id: UUID,
        to: str,
        allowed_from: Sequence[str],
        now: int,
        *,
        device_id: UUID | None = None,
        deadline: int | None = None,
        response: Any = UNSET,
        error: str | None = None,
        add_attempts: int = 0,
        only_if_next: bool = False,
    ) -> Command | None:
        """Move a command to `to` only if its status is in `allowed_from` (one transaction
        with its transition row); None when it was not (someone else moved it first).
        `only_if_next`: also only if it is its device's next command: none other in flight and
        none older QUEUED, checked and moved atomically even when processes race."""
        ...

    async def queued_commands(self, scope: Scope, device_id: UUID, limit: int) -> list[Command]:
        """A device's QUEUED commands in creation order."""
        ...

    async def claim_next_command(
        self, scope: Scope, device_id: UUID, now: int, *, only_if_next: bool = False
    ) -> Claimed | None:
        """Move the device's oldest QUEUED command that has not expired to SENT (its deadline
        `now + timeout_ms`, one more attempt), atomically; None when there is none, or, with
        `only_if_next`, when another command of the device is in flight."""
        ...

    async def answer_command(
        self, scope: Scope, command_id: UUID, device_id: UUID, response: Any, now: int
    ) -> Answered | None:
        """The device's answer: its open two-way command becomes SUCCESSFUL with `response`,
        atomically, with DELIVERED recorded first if it was SENT. None when the command is
        not an open two-way command of this device."""
        ...

    async def due_commands(self, scope: Scope, now: int, limit: int) -> list[Command]:
        """Open commands past their deadline or expiry (for the sweeper)."""
        ...

    async def command_in_flight(self, scope: Scope, device_id: UUID) -> Command | None:
        """The device's oldest command in flight, if any."""
        ...

    async def queued_devices(self, scope: Scope, before: int, limit: int) -> list[UUID]:
        """Devices with a command QUEUED since before `before` (Unix ms)."""
        ...

    async def stale_sent_commands(self, scope: Scope, limit: int) -> list[Command]:
        """Persistent commands left SENT (for a restart of a single-process platform)."""
        ...

    async def get_attributes(
        self,
        scope: Scope,
        device_id: UUID,
        scopes: Sequence[str],
        keys: Sequence[str] | None,
    ) -> dict[str, dict[str, AttributeValue]]:
        """The device's attributes in these scopes (every scope present as a key)."""
        ...

    async def set_attributes(
        self, scope: Scope, device_id: UUID, attr_scope: str, values: Mapping[str, Any], now: int
    ) -> None:
        """Merge attributes into a scope (JSON values)."""
        ...

    async def delete_attributes(
        self, scope: Scope, device_id: UUID, attr_scope: str, keys: Sequence[str]
    ) -> list[str]:
        """Delete keys from a scope; returns the keys that existed."""
        ...
