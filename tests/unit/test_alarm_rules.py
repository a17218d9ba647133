"""Rule semantics, table-driven: every operator, for-durations, hysteresis, inactivity, replay."""

from __future__ import annotations

from typing import Any

import pytest

from iiot.alarms.rules import (
    RuleState,
    matches,
    parse_rule,
    step,
    tick,
    tick_inactivity,
    touch_inactivity,
)
from iiot.errors import InvalidRequest

DEVICE = "7c0f3a52-2b7e-4bb8-9a59-0e1e7b9a3c11"


def rule(create: dict[str, Any], clear: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "r",
        "target": {"device_id": DEVICE},
        "key": "t",
        "severity": "MAJOR",
        "create": create,
    }
    if clear is not None:
        body["clear"] = clear
    return parse_rule(body)


@pytest.mark.parametrize(
    ("op", "threshold", "value", "expected"),
    [
        ("gt", 80, 81, True),
        ("gt", 80, 80, False),
        ("gt", 80, 79.5, False),
        ("ge", 80, 80, True),
        ("ge", 80, 79.99, False),
        ("lt", 10, 9, True),
        ("lt", 10, 10, False),
        ("le", 10, 10, True),
        ("le", 10, 10.01, False),
        ("eq", 3, 3.0, True),
        ("eq", 3, 4, False),
        ("ne", 3, 4, True),
        ("ne", 3, 3, False),
        ("eq", "FAULT", "FAULT", True),
        ("eq", "FAULT", "fault", False),
        ("ne", "RUN", "STOP", True),
        ("eq", True, True, True),
        ("eq", True, False, False),
        ("ne", False, True, True),
        # values of another kind cannot be compared: the point is ignored
        ("gt", 80, "hot", None),
        ("gt", 80, True, None),
        ("eq", 1, True, None),
        ("eq", True, 1, None),
        ("eq", "1", 1, None),
    ],
)
def test_every_operator(op: str, threshold: Any, value: Any, expected: bool | None) -> None:
    assert matches({"op": op, "value": threshold}, value) is expected


def run(spec: dict[str, Any], points: list[tuple[int, Any]]) -> tuple[RuleState, list[Any]]:
    state = RuleState()
    actions = []
    for ts, value in points:
        state, action = step(spec, state, ts, value)
        if action is not None:
            actions.append((action.kind, action.ts, action.value))
    return state, actions


@pytest.mark.parametrize(
    ("create", "clear", "points", "expected"),
    [
        # ThingsBoard's worked example: 18 -> 22 -> 25 -> 18, threshold 20: one alarm.
        (
            {"op": "gt", "value": 20},
            None,
            [(1, 18), (2, 22), (3, 25), (4, 18)],
            [("raise", 2, 22), ("update", 3, 25), ("clear", 4, None)],
        ),
        # for-duration: raised only once the condition held 5 s, reset by a good value.
        (
            {"op": "gt", "value": 80, "for_s": 5},
            None,
            [(0, 90), (3000, 85), (4000, 70), (5000, 90), (9000, 95), (10_000, 91)],
            [("raise", 10_000, 91)],
        ),
        # hysteresis: create > 80, clear < 75; 78 neither clears nor raises again.
        (
            {"op": "gt", "value": 80},
            {"op": "lt", "value": 75},
            [(1, 85), (2, 78), (3, 79), (4, 74), (5, 78), (6, 81)],
            [("raise", 1, 85), ("clear", 4, None), ("raise", 6, 81)],
        ),
        # clear for-duration: the clear condition must hold 2 s.
        (
            {"op": "gt", "value": 80},
            {"op": "lt", "value": 75, "for_s": 2},
            [(0, 90), (1000, 70), (2000, 78), (3000, 70), (4000, 70), (5000, 70)],
            [("raise", 0, 90), ("clear", 5000, None)],
        ),
        # string states
        (
            {"op": "eq", "value": "FAULT"},
            None,
            [(1, "RUN"), (2, "FAULT"), (3, "RUN")],
            [("raise", 2, "FAULT"), ("clear", 3, None)],
        ),
        # a text value for a numeric rule moves nothing
        (
            {"op": "gt", "value": 80},
            None,
            [(1, 90), (2, "n/a"), (3, 70)],
            [("raise", 1, 90), ("clear", 3, None)],
        ),
    ],
)
def test_sequences(
    create: dict[str, Any],
    clear: dict[str, Any] | None,
    points: list[tuple[int, Any]],
    expected: list[Any],
) -> None:
    _, actions = run(rule(create, clear), points)
    assert actions == expected


def test_replayed_and_late_points_do_not_move_the_state() -> None:
    spec = rule({"op": "gt", "value": 80})
    state, actions = run(spec, [(10, 90), (20, 70)])
    assert actions == [("raise", 10, 90), ("clear", 20, None)]
    for ts, value in [(10, 90), (15, 99), (20, 70), (5, 100)]:
        again, action = step(spec, state, ts, value)
        assert (again, action) == (state, None)


def test_same_result_in_any_arrival_order_of_one_batch() -> None:
    spec = rule({"op": "gt", "value": 80, "for_s": 2})
    points = [(0, 90), (1000, 91), (2000, 92), (3000, 50)]
    in_order, _ = run(spec, points)
    # The engine sorts a batch by ts before stepping; a replay of all of it changes nothing.
    replayed = in_order
    for ts, value in sorted(points):
        replayed, action = step(spec, replayed, ts, value)
        assert action is None
    assert replayed == in_order


def test_for_duration_finishes_on_a_timer_without_new_points() -> None:
    spec = rule({"op": "gt", "value": 80, "for_s": 10})
    state, action = step(spec, RuleState(), 1000, 90)
    assert action is None and state.pending_since == 1000
    assert tick(spec, state, 10_999) == (state, None)
    raised, action = tick(spec, state, 11_000)
    assert action is not None and (action.kind, action.ts, action.value) == ("raise", 11_000, 90)
    assert raised.active and raised.pending_since is None


def test_state_round_trips_through_json() -> None:
    spec = rule({"op": "gt", "value": 80, "for_s": 10})
    state, _ = step(spec, RuleState(), 1000, 90)
    assert RuleState.of(state.to_json()) == state


def test_inactivity_raises_after_silence_and_data_clears() -> None:
    spec = parse_rule(
        {
            "name": "silent",
            "kind": "inactivity",
            "target": {"device_type": "pump"},
            "severity": "WARNING",
            "timeout_s": 60,
        }
    )
    state, action = touch_inactivity(RuleState(), 1000)
    assert action is None
    assert tick_inactivity(spec, state, 60_999) == (state, None)
    state, action = tick_inactivity(spec, state, 61_000)
    assert action is not None and (action.kind, action.ts) == ("raise", 61_000)
    assert tick_inactivity(spec, state, 200_000) == (state, None)  # raised once
    state, action = touch_inactivity(state, 70_000)
    assert action is not None and action.kind == "clear" and not state.active


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "name"),
        ({"name": "x"}, "severity"),
        ({"name": "x", "severity": "HIGH"}, "severity must be one of"),
        ({"name": "x", "severity": "MAJOR", "target": {}}, "target"),
        ({"name": "x", "severity": "MAJOR", "target": {"device_id": "nope"}}, "not a UUID"),
        (
            {"name": "x", "severity": "MAJOR", "target": {"device_type": "a"}, "key": "t"},
            "create must be an object",
        ),
        (
            {
                "name": "x",
                "severity": "MAJOR",
                "target": {"device_type": "a"},
                "key": "t",
                "create": {"op": "between", "value": 1},
            },
            "create.op must be one of gt, ge, lt, le, eq, ne",
        ),
        (
            {
                "name": "x",
                "severity": "MAJOR",
                "target": {"device_type": "a"},
                "key": "t",
                "create": {"op": "gt", "value": "hot"},
            },
            "create.value must be a number for op gt",
        ),
        (
            {
                "name": "x",
                "severity": "MAJOR",
                "target": {"device_type": "a"},
                "key": "t",
                "create": {"op": "gt", "value": 1, "for_s": -1},
            },
            "create.for_s must be between",
        ),
        (
            {
                "name": "x",
                "severity": "MAJOR",
                "target": {"device_type": "a"},
                "key": "t",
                "create": {"op": "gt", "value": 1},
                "clear": {"op": "lt"},
            },
            "clear.value is required",
        ),
        (
            {"name": "x", "severity": "MAJOR", "target": {"device_type": "a"}, "colour": 1},
            "unknown field(s) for a threshold rule: colour",
        ),
        (
            {
                "name": "x",
                "kind": "inactivity",
                "severity": "MAJOR",
                "target": {"device_type": "a"},
            },
            "timeout_s must be a number",
        ),
        ({"name": "x", "kind": "sometimes"}, "kind must be threshold or inactivity"),
    ],
)
def test_bad_rules_say_what_is_wrong(body: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_rule(body)


def test_defaults() -> None:
    spec = rule({"op": "gt", "value": 1})
    assert spec["alarm_type"] == "r" and spec["enabled"] is True and spec["clear"] is None
    assert spec["create"]["for_s"] == 0


@pytest.mark.parametrize("huge", [10**400, -(10**30)])
def test_numbers_beyond_a_double_are_refused(huge: int) -> None:
    body = {
        "name": "x",
        "severity": "MAJOR",
        "target": {"device_type": "a"},
        "key": "t",
        "create": {"op": "gt", "value": huge},
    }
    with pytest.raises(InvalidRequest, match=r"create\.value must be a number within"):
        parse_rule(body)
    body["create"] = {"op": "gt", "value": 1, "for_s": huge}
    with pytest.raises(InvalidRequest, match="for_s must be a number of seconds"):
        parse_rule(body)
