"""`AlarmEngine`: evaluates rules on committed telemetry from the live bus.

It never sits on the write path: the pipeline publishes a `TelemetryEvent` after the
commit and devices are acknowledged whatever the engine does. One task owns every
(rule, device) state, so points, timers and rule changes never interleave. A state is
persisted at each transition (pending started or reset, raised, cleared), so a
for-duration in progress survives a restart. Several processes may evaluate the same
device: the database's unique index on open alarms decides, never this code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any, Self
from uuid import UUID

from iiot.alarms.model import Rule, Severity
from iiot.alarms.rules import Action, RuleState, step, tick, tick_inactivity, touch_inactivity
from iiot.alarms.service import AlarmService
from iiot.bus import DeviceEvent, LiveEvent, RecordEvent, TelemetryEvent
from iiot.errors import IIoTError, NotFound
from iiot.model import Device, DevicePoints
from iiot.services import Services
from iiot.supervisor import cancel_and_wait

__all__ = ["AlarmEngine"]

log = logging.getLogger(__name__)

StateKey = tuple[UUID, UUID]  # (rule, device)
# A rule's evaluation that needs I/O: (rule, device, key, old state, new state, actions).
_Work = tuple[Rule, Device, StateKey, RuleState, RuleState, list[Action | None]]
# An open alarm's end_ts is written at most this often per (rule, device).
_UPDATE_EVERY_MS = 1000
_DEVICE_PAGE = 1000
# Rule changes arrive on the live bus; processes without a bridge between them (several
# `--role all` on one database) still see them within this time.
_RELOAD_S = 5.0
# Devices of a type, for inactivity rules: listed again this often (and on device changes).
_TARGETS_TTL_S = 10.0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _evaluated(event: LiveEvent) -> bool:
    """The bus events the engine follows: points, rule changes, device changes."""
    return isinstance(event, TelemetryEvent | DeviceEvent) or (
        isinstance(event, RecordEvent) and event.topic == "rule"
    )


class AlarmEngine:
    """Rule evaluation on the live bus, with timers for for-durations and inactivity."""

    name = "alarms"

    def __init__(self, services: Services, tick_s: float = 0.5) -> None:
        """Nothing runs before `__aenter__`."""
        if services.alarms is None:
            raise RuntimeError("the alarm engine needs services.alarms")
        self._services = services
        self._alarms: AlarmService = services.alarms
        self._tick_s = tick_s
        self._rules: dict[UUID, Rule] = {}
        self._by_device: dict[UUID, list[Rule]] = {}
        self._by_type: dict[tuple[UUID, str], list[Rule]] = {}
        self._states: dict[StateKey, RuleState] = {}
        self._updated: dict[StateKey, int] = {}  # last end_ts written per open alarm
        self._deferred: dict[StateKey, tuple[Rule, Device, Action]] = {}
        self._type_targets: dict[UUID, tuple[float, list[Device]]] = {}
        self._started_ms = 0
        self._queue: asyncio.Queue[LiveEvent] | None = None
        self._task: asyncio.Task[None] | None = None
        self._reload = False

    async def __aenter__(self) -> Self:
        """Load rules and states, then follow the bus."""
        self._started_ms = _now_ms()
        # Subscribed before loading: no point committed meanwhile is missed.
        self._queue = self._services.bus.subscribe(maxsize=200_000, wants=_evaluated)
        try:
            await self._load_rules()
            stored = await self._alarms.store.rule_states()
        except BaseException:
            self._services.bus.unsubscribe(self._queue)
            raise
        for key, raw in stored.items():
            if key[0] in self._rules:
                self._states[key] = RuleState.of(raw)
        self._task = asyncio.create_task(self._run(), name="alarm-engine")
        self._services.health.set("alarms", "up", f"{len(self._rules)} rules")
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop evaluating."""
        await cancel_and_wait(self._task)
        self._task = None
        if self._queue is not None:
            self._services.bus.unsubscribe(self._queue)
            self._queue = None

    def backlog(self) -> int:
        """Live events received but not evaluated yet."""
        return 0 if self._queue is None else self._queue.qsize()

    def describe(self) -> str:
        """One line for the start-up log."""
        return f"alarm engine ({len(self._rules)} rules)"

    # --- rules -------------------------------------------------------------------------
    async def _load_rules(self) -> None:
        rules = {r.id: r for r in await self._alarms.store.all_rules() if r.enabled}
        for key in list(self._states):
            old, new = self._rules.get(key[0]), rules.get(key[0])
            if new is None or old is None or old.updated_at != new.updated_at:
                self._states.pop(key, None)  # deleted or replaced: it starts over
        self._rules = rules
        self._type_targets.clear()
        for key in [k for k in self._deferred if k[0] not in rules]:
            del self._deferred[key]
        self._by_device = {}
        self._by_type = {}
        for rule in rules.values():
            if rule.device_id is not None:
                self._by_device.setdefault(rule.device_id, []).append(rule)
            elif rule.device_type is not None:
                self._by_type.setdefault((rule.tenant_id, rule.device_type), []).append(rule)

    # --- the loop ----------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._queue is not None
        next_tick = time.monotonic()
        next_reload = next_tick + _RELOAD_S
        while True:
            timeout = max(0.0, next_tick - time.monotonic())
            event: LiveEvent | None = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):  # not wait_for: see cancel_and_wait
                    event = await self._queue.get()
            try:
                if event is not None:
                    await self._handle(event)
                if self._reload or time.monotonic() >= next_reload:
                    self._reload = False
                    next_reload = time.monotonic() + _RELOAD_S
                    await self._load_rules()
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self._tick_s
                    await self._tick(_now_ms())
            except asyncio.CancelledError:
                raise
            except IIoTError as exc:  # storage unavailable: the next event or tick retries
                log.warning("alarm evaluation failed: %s", exc)
            except Exception:
                log.exception("alarm evaluation failed")

    async def _handle(self, event: LiveEvent) -> None:
        if isinstance(event, TelemetryEvent):
            if self._rules:
                for item in event.batch:
                    for work in self._evaluate(item):
                        await self._apply(*work)
        elif isinstance(event, RecordEvent) and event.topic == "rule":
            self._reload = True
        elif isinstance(event, DeviceEvent):
            self._type_targets.clear()  # a device was added, changed or removed
            if event.kind == "deleted":
                for key in [k for k in self._states if k[1] == event.device.id]:
                    self._states.pop(key, None)

    def _evaluate(self, item: DevicePoints) -> list[_Work]:
        """Step every rule of the device (synchronously: the hot path); what needs I/O."""
        device = item.device
        rules = self._by_device.get(device.id)
        if self._by_type:
            typed = self._by_type.get((device.tenant_id, device.type))
            if typed:
                rules = typed if rules is None else rules + typed
        if not rules:
            return []
        work: list[_Work] = []
        for rule in rules:
            key = (rule.id, device.id)
            state = self._states.get(key) or RuleState()
            if rule.spec["kind"] == "inactivity":
                new, action = touch_inactivity(state, _now_ms())
                if action is not None:
                    work.append((rule, device, key, state, new, [action]))
                else:
                    self._states[key] = new
                continue
            name = rule.spec["key"]
            points = [p for p in item.points if p.key == name]
            if not points:
                continue
            if len(points) > 1:
                points.sort(key=lambda p: p.ts)
            actions: list[Action | None] = []
            new = state
            for point in points:
                new, action = step(rule.spec, new, point.ts, point.value)
                if action is not None:
                    actions.append(action)
            if actions or state.transitioned(new):
                work.append((rule, device, key, state, new, actions))
            else:
                self._states[key] = new  # nothing to do or persist: the usual case
        return work

    async def _apply(
        self,
        rule: Rule,
        device: Device,
        key: StateKey,
        old: RuleState,
        new: RuleState,
        actions: Iterable[Action | None],
    ) -> None:
        """Carry out the actions in order, then persist the state if it transitioned."""
        pending_update: Action | None = None
        for action in actions:
            if action is None:
                continue
            if action.kind == "update":
                pending_update = action
                continue
            pending_update = None
            await self._act(rule, device, key, action)
        if pending_update is not None:
            last = self._updated.get(key, 0)
            if pending_update.ts - last >= _UPDATE_EVERY_MS:
                await self._act(rule, device, key, pending_update)
            else:  # written by the next tick: end_ts is exact, with few writes
                self._deferred[key] = (rule, device, pending_update)
        self._states[key] = new
        if old.transitioned(new):
            await self._alarms.store.save_rule_state(rule.id, device.id, new.to_json())

    async def _act(self, rule: Rule, device: Device, key: StateKey, action: Action) -> None:
        spec = rule.spec
        alarm_type = str(spec["alarm_type"])
        self._deferred.pop(key, None)
        if action.kind == "clear":
            self._updated.pop(key, None)
            await self._alarms.clear_open(device.id, alarm_type, action.ts)
            return
        details: dict[str, Any] = {"rule": rule.name}
        if spec["kind"] == "threshold":
            details.update(
                key=spec["key"], op=spec["create"]["op"], threshold=spec["create"]["value"]
            )
        else:
            details.update(timeout_s=spec["timeout_s"])
        self._updated[key] = action.ts
        try:
            await self._alarms.raise_alarm(
                rule.tenant_id,
                device.id,
                alarm_type,
                Severity(spec["severity"]),
                action.ts,
                action.value,
                rule.id,
                details,
            )
        except NotFound:
            self._states.pop(key, None)  # the device was deleted meanwhile

    # --- timers ------------------------------------------------------------------------
    async def _tick(self, now: int) -> None:
        for key, deferred in list(self._deferred.items()):
            await self._act(deferred[0], deferred[1], key, deferred[2])
        for key, state in list(self._states.items()):
            rule = self._rules.get(key[0])
            if rule is None or rule.spec["kind"] != "threshold":
                continue
            if state.pending_since is None and state.clear_since is None:
                continue
            new, action = tick(rule.spec, state, now)
            if action is not None:
                device = await self._device(key[1])
                if device is None:
                    self._states.pop(key, None)
                    continue
                await self._apply(rule, device, key, state, new, [action])
        for rule in self._rules.values():
            if rule.spec["kind"] == "inactivity":
                await self._tick_inactivity(rule, now)

    async def _device(self, device_id: UUID) -> Device | None:
        try:
            return await self._services.registry.get(device_id)
        except NotFound:
            return None

    async def _targets(self, rule: Rule) -> list[Device]:
        if rule.device_id is not None:
            device = await self._device(rule.device_id)
            return [] if device is None else [device]
        cached = self._type_targets.get(rule.id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        found = await self._devices_of_type(rule)
        self._type_targets[rule.id] = (time.monotonic() + _TARGETS_TTL_S, found)
        return found

    async def _devices_of_type(self, rule: Rule) -> list[Device]:
        found: list[Device] = []
        offset = 0
        store = self._services.store
        while True:
            page = await store.list_devices(rule.tenant_id, _DEVICE_PAGE, offset)
            found += [d for d in page.items if d.type == rule.device_type]
            offset += len(page.items)
            if not page.items or offset >= page.total:
                return found

    async def _tick_inactivity(self, rule: Rule, now: int) -> None:
        for device in await self._targets(rule):
            key = (rule.id, device.id)
            state = self._states.get(key)
            if state is None or state.last_ts is None:
                # Counting starts with what is known: the device's last message, the rule's
                # last change, or (without presence data) this process's start.
                known = [rule.updated_at, device.last_seen or self._started_ms]
                state = RuleState(active=state.active if state else False, last_ts=max(known))
                self._states[key] = state
            elif device.last_seen is not None and device.last_seen > state.last_ts:
                # A message this process did not see (another process, attributes).
                new, action = touch_inactivity(state, device.last_seen)
                if action is not None:
                    await self._apply(rule, device, key, state, new, [action])
                    continue
                state = new
                self._states[key] = state
            new, action = tick_inactivity(rule.spec, state, now)
            if action is not None:
                await self._apply(rule, device, key, state, new, [action])
