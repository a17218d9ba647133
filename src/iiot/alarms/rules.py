"""Rules: validation of the REST body and pure, replay-safe evaluation.

A threshold rule raises when `create` has held for `create.for_s` seconds and clears when
`clear` (by default the negation of `create`) has held for `clear.for_s` seconds; a
separate `clear` threshold gives hysteresis. An inactivity rule raises when a device
sent nothing for `timeout_s` seconds, and any message clears it.

Evaluation is a function of (rule, state, point): a point no newer than the newest one
seen leaves the state as it is, so replayed or late points cannot move it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal
from uuid import UUID

from iiot.alarms.model import Severity
from iiot.errors import InvalidRequest

__all__ = [
    "OPS",
    "Action",
    "RuleState",
    "matches",
    "parse_rule",
    "step",
    "tick",
    "tick_inactivity",
    "touch_inactivity",
]

OPS = ("gt", "ge", "lt", "le", "eq", "ne")
_ORDERING = ("gt", "ge", "lt", "le")
MAX_FOR_S = 30 * 86_400
_MAX_TEXT = 255
_THRESHOLD_FIELDS = {"name", "kind", "target", "key", "severity", "create", "clear"}
_THRESHOLD_FIELDS |= {"alarm_type", "enabled"}
_INACTIVITY_FIELDS = {"name", "kind", "target", "severity", "timeout_s", "alarm_type", "enabled"}


def _text(body: dict[str, Any], name: str, where: str = "") -> str:
    value = body.get(name)
    if not isinstance(value, str) or not 1 <= len(value) <= _MAX_TEXT or value != value.strip():
        raise InvalidRequest(
            f"{where}{name} must be a string of 1 to {_MAX_TEXT} characters without "
            f"leading or trailing spaces (got {value!r})"
        )
    if any(ord(c) < 0x20 for c in value):
        raise InvalidRequest(f"{where}{name} must not contain control characters")
    return value


def _finite(value: Any) -> bool:
    """A JSON number that fits a double (JSON integers may be far larger)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, int):
        return abs(value) <= 2**63
    return math.isfinite(value)


def _seconds(value: Any, name: str, minimum: float) -> float | int:
    if not _finite(value):
        raise InvalidRequest(f"{name} must be a number of seconds (got {value!r:.40})")
    if not minimum <= value <= MAX_FOR_S:
        raise InvalidRequest(f"{name} must be between {minimum} and {MAX_FOR_S} (got {value})")
    number: float | int = value
    return number


def _condition(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidRequest(f'{where} must be an object {{"op", "value", "for_s"}}')
    unknown = set(raw) - {"op", "value", "for_s"}
    if unknown:
        raise InvalidRequest(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    op = raw.get("op")
    if op not in OPS:
        raise InvalidRequest(f"{where}.op must be one of {', '.join(OPS)} (got {op!r})")
    if "value" not in raw:
        raise InvalidRequest(f"{where}.value is required")
    value = raw["value"]
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if numeric and not _finite(value):
        raise InvalidRequest(f"{where}.value must be a number within ±2^63")
    if op in _ORDERING and not numeric:
        raise InvalidRequest(f"{where}.value must be a number for op {op} (got {value!r})")
    if not numeric and not isinstance(value, bool | str):
        raise InvalidRequest(f"{where}.value must be a number, boolean or string")
    for_s = _seconds(raw.get("for_s", 0), f"{where}.for_s", 0)
    return {"op": op, "value": value, "for_s": for_s}


def _target(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict) or len(raw) != 1 or not {"device_id", "device_type"} & set(raw):
        raise InvalidRequest('target must be {"device_id": ...} or {"device_type": ...}')
    if "device_id" in raw:
        try:
            return {"device_id": str(UUID(str(raw["device_id"])))}
        except ValueError:
            raise InvalidRequest(f"target.device_id is not a UUID: {raw['device_id']!r}") from None
    return {"device_type": _text(raw, "device_type", "target.")}


def parse_rule(body: Any) -> dict[str, Any]:
    """The normalized specification of a rule body; `InvalidRequest` says what is wrong."""
    if not isinstance(body, dict):
        raise InvalidRequest("a rule must be a JSON object")
    kind = body.get("kind", "threshold")
    if kind not in ("threshold", "inactivity"):
        raise InvalidRequest(f"kind must be threshold or inactivity (got {kind!r})")
    allowed = _THRESHOLD_FIELDS if kind == "threshold" else _INACTIVITY_FIELDS
    unknown = set(body) - allowed
    if unknown:
        raise InvalidRequest(f"unknown field(s) for a {kind} rule: {', '.join(sorted(unknown))}")
    name = _text(body, "name")
    severity = body.get("severity")
    if severity not in Severity.__members__:
        raise InvalidRequest(
            f"severity must be one of {', '.join(Severity.__members__)} (got {severity!r})"
        )
    enabled = body.get("enabled", True)
    if not isinstance(enabled, bool):
        raise InvalidRequest(f"enabled must be true or false (got {enabled!r})")
    alarm_type = _text(body, "alarm_type") if body.get("alarm_type") is not None else name
    spec: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "target": _target(body.get("target")),
        "severity": severity,
        "alarm_type": alarm_type,
        "enabled": enabled,
    }
    if kind == "inactivity":
        spec["timeout_s"] = _seconds(body.get("timeout_s"), "timeout_s", 1)
        return spec
    spec["key"] = _text(body, "key")
    spec["create"] = _condition(body.get("create"), "create")
    clear = body.get("clear")
    spec["clear"] = None if clear is None else _condition(clear, "clear")
    return spec


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def matches(condition: dict[str, Any], value: Any) -> bool | None:
    """Whether the value meets the condition; None when they cannot be compared."""
    op, target = condition["op"], condition["value"]
    if op in _ORDERING:
        number = _number(value)
        if number is None:
            return None
        threshold = float(target)
        return {
            "gt": number > threshold,
            "ge": number >= threshold,
            "lt": number < threshold,
            "le": number <= threshold,
        }[op]
    # eq / ne: numbers compare as numbers, booleans and strings only with their own kind.
    if _number(target) is not None:
        number = _number(value)
        if number is None:
            return None
        equal = number == float(target)
    elif type(value) is not type(target):
        return None
    else:
        equal = value == target
    return equal if op == "eq" else not equal


@dataclass(slots=True)  # not frozen: built for every point, and frozen init is slower
class RuleState:
    """Where a rule stands for one device; persisted at each transition."""

    active: bool = False
    pending_since: int | None = None  # the create condition holds since (ms)
    pending_value: Any = None  # the value that started it
    clear_since: int | None = None  # the clear condition holds since (ms)
    last_ts: int | None = None  # newest point (or message, for inactivity) seen

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict for the database."""
        return {
            "active": self.active,
            "pending_since": self.pending_since,
            "pending_value": self.pending_value,
            "clear_since": self.clear_since,
            "last_ts": self.last_ts,
        }

    @staticmethod
    def of(raw: dict[str, Any]) -> RuleState:
        """The state from its stored dict."""
        return RuleState(
            bool(raw.get("active")),
            raw.get("pending_since"),
            raw.get("pending_value"),
            raw.get("clear_since"),
            raw.get("last_ts"),
        )

    def transitioned(self, other: RuleState) -> bool:
        """Whether anything but the newest timestamp differs (worth persisting)."""
        return (
            self.active != other.active
            or self.pending_since != other.pending_since
            or self.clear_since != other.clear_since
        )


@dataclass(frozen=True, slots=True)
class Action:
    """What the engine must do: raise (or update) the open alarm, or clear it."""

    kind: Literal["raise", "update", "clear"]
    ts: int
    value: Any = None


def _for_ms(condition: dict[str, Any] | None) -> int:
    return 0 if condition is None else int(float(condition["for_s"]) * 1000)


def _clear_holds(spec: dict[str, Any], value: Any, created: bool) -> bool | None:
    clear = spec.get("clear")
    if clear is None:
        return not created
    return matches(clear, value)


def step(
    spec: dict[str, Any], state: RuleState, ts: int, value: Any
) -> tuple[RuleState, Action | None]:
    """The state after one point of the rule's key, and what to do about it."""
    if state.last_ts is not None and ts <= state.last_ts:
        return state, None  # replayed or late: the newest point already decided
    created = matches(spec["create"], value)
    if created is None:
        return state, None  # a value of another kind (text for a numeric rule)
    if not state.active and not created:
        return RuleState(False, None, None, None, ts), None  # the common case, kept cheap
    state = replace(state, last_ts=ts)
    if not state.active:
        if state.pending_since is None:
            state = replace(state, pending_since=ts, pending_value=value)
        return _raise_if_due(spec, state, ts, value)
    if created:
        return replace(state, clear_since=None), Action("update", ts, value)
    if not _clear_holds(spec, value, created):
        return replace(state, clear_since=None), None  # between the thresholds: hysteresis
    if state.clear_since is None:
        state = replace(state, clear_since=ts)
    return _clear_if_due(spec, state, ts)


def _raise_if_due(
    spec: dict[str, Any], state: RuleState, now: int, value: Any
) -> tuple[RuleState, Action | None]:
    assert state.pending_since is not None
    due = state.pending_since + _for_ms(spec["create"])
    if now < due:
        return state, None
    raised = replace(state, active=True, pending_since=None, pending_value=None, clear_since=None)
    return raised, Action("raise", due, value)


def _clear_if_due(
    spec: dict[str, Any], state: RuleState, now: int
) -> tuple[RuleState, Action | None]:
    assert state.clear_since is not None
    due = state.clear_since + _for_ms(spec.get("clear"))
    if now < due:
        return state, None
    return replace(state, active=False, clear_since=None), Action("clear", due)


def tick(spec: dict[str, Any], state: RuleState, now: int) -> tuple[RuleState, Action | None]:
    """Finish a for-duration that has run out without a new point (the condition still holds)."""
    if not state.active and state.pending_since is not None:
        return _raise_if_due(spec, state, now, state.pending_value)
    if state.active and state.clear_since is not None:
        return _clear_if_due(spec, state, now)
    return state, None


def touch_inactivity(state: RuleState, now: int) -> tuple[RuleState, Action | None]:
    """A message arrived: remember when, and clear an open inactivity alarm."""
    last = now if state.last_ts is None else max(state.last_ts, now)
    if state.active:
        return replace(state, active=False, last_ts=last), Action("clear", now)
    return replace(state, last_ts=last), None


def tick_inactivity(
    spec: dict[str, Any], state: RuleState, now: int
) -> tuple[RuleState, Action | None]:
    """Raise when nothing arrived for `timeout_s` since the last message."""
    if state.active or state.last_ts is None:
        return state, None
    due = state.last_ts + int(float(spec["timeout_s"]) * 1000)
    if now < due:
        return state, None
    return replace(state, active=True), Action("raise", due, None)
