"""The command lifecycle's rules: which state may follow which, request defaults, when a
waiting sender has its answer and when a device is free for its next command.

QUEUED -> SENT -> DELIVERED -> SUCCESSFUL, or TIMEOUT, EXPIRED, FAILED, CANCELED. The only
ways back to QUEUED are a TIMEOUT with a retry left (or a persistent command the device
never confirmed) and a link that failed before the device confirmed (SENT -> QUEUED).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from iiot.errors import InvalidRequest

if TYPE_CHECKING:
    from iiot.storage.control import Command

__all__ = [
    "CANCELABLE",
    "CLAIMABLE",
    "DAY_MS",
    "EXPIRABLE",
    "CommandRequest",
    "frees_device",
    "settled",
    "settled_data",
]

DAY_MS = 24 * 3600 * 1000
CLAIMABLE = ("QUEUED",)
EXPIRABLE = ("QUEUED", "SENT", "DELIVERED", "TIMEOUT")
CANCELABLE = ("QUEUED", "SENT", "TIMEOUT")  # not yet delivered
MAX_TIMEOUT_MS = 3_600_000
MAX_RETRIES = 10


@dataclass(frozen=True, slots=True)
class CommandRequest:
    """A command as a sender asks for it (REST body, OPC UA call)."""

    method: str
    params: Any = None
    oneway: bool = False
    persistent: bool = False
    timeout_ms: int = 10_000
    expires_at: int | None = None
    retries: int = 0

    def check(self, now: int) -> None:
        """Refuse what cannot be carried out, saying what is wrong."""
        if not self.method or len(self.method) > 255:
            raise InvalidRequest("method must be 1 to 255 characters")
        if not 100 <= self.timeout_ms <= MAX_TIMEOUT_MS:
            raise InvalidRequest(f"timeout_ms must be between 100 and {MAX_TIMEOUT_MS}")
        if not 0 <= self.retries <= MAX_RETRIES:
            raise InvalidRequest(f"retries must be between 0 and {MAX_RETRIES}")
        if self.expires_at is not None and self.expires_at <= now:
            raise InvalidRequest("expires_at must be in the future (Unix ms)")

    def expiry(self, now: int) -> int:
        """When the command expires: as asked, else a day (persistent) or its attempts."""
        if self.expires_at is not None:
            return self.expires_at
        if self.persistent:
            return now + DAY_MS
        return now + self.timeout_ms * (self.retries + 1)


def frees_device(status: str, data: Any) -> bool:
    """Whether a command event (its status and REST data) may leave its device with nothing
    in flight: the next command may go (`IIOT_COMMANDS_SEQUENTIAL`)."""
    if status == "DELIVERED":
        return bool(data.get("oneway"))
    return status not in ("QUEUED", "SENT")


def settled_data(data: Any) -> bool:
    """`settled` on a command's REST representation (a bus event's data)."""
    status = data.get("status")
    if status in ("SUCCESSFUL", "EXPIRED", "FAILED", "CANCELED"):
        return True
    if status == "TIMEOUT":
        return True  # read it: whether a retry follows is in the stored deadline
    return bool(data.get("oneway")) and status == "DELIVERED"


def settled(command: Command) -> bool:
    """Whether a waiting sender has its answer."""
    if command.status in ("SUCCESSFUL", "EXPIRED", "FAILED", "CANCELED"):
        return True
    if command.status == "TIMEOUT" and command.deadline is None:
        return True  # timed out with no retry left
    return command.oneway and command.status == "DELIVERED"
