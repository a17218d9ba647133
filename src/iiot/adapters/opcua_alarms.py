"""OPC UA Alarms & Conditions: each platform alarm as `AlarmConditionType` events.

Every change of an alarm (raised, escalated, acknowledged, cleared) fires an
`AlarmConditionType` event on its device object, so SCADA alarm views subscribed to the
device show it live. While an alarm is retained (not both cleared and acknowledged) it
has a condition object `device:{device}:alarm:{alarm}` under its device: the event's
ConditionId. The standard `Acknowledge(EventId, Comment)` method called on it (or on the
device, with the EventId of one of its events) acknowledges the alarm in the platform,
where the REST API shows it at once. Operators (`tenant_user`) may acknowledge, as in
the REST API; anonymous sessions may not.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from asyncua import ua as _ua
from asyncua.common import events
from asyncua.server.event_generator import EventGenerator
from asyncua.server.server import Server

from iiot.adapters import opcua_ids as ids
from iiot.adapters.opcua_access import CURRENT_USER
from iiot.alarms.model import AlarmFilter, AlarmStatus
from iiot.bus import DeviceEvent, LiveEvent, RecordEvent
from iiot.errors import IIoTError, NotFound
from iiot.services import Services
from iiot.supervisor import cancel_and_wait

__all__ = ["OpcUaAlarms", "condition_node"]

ua: Any = _ua
log = logging.getLogger(__name__)

# OPC UA severities are 1..1000.
_SEVERITY = {"CRITICAL": 900, "MAJOR": 700, "MINOR": 500, "WARNING": 300, "INDETERMINATE": 100}
_ACKNOWLEDGE = 9111  # AcknowledgeableConditionType.Acknowledge (ns=0)
_EVENT_IDS = 10_000  # recent EventIds remembered for an Acknowledge on the device itself
_RETAINED_AT_START = 1000
_DEVICE_PAGE = 1000


def condition_node(ns: int, device_id: UUID, alarm_id: UUID) -> Any:
    """The ConditionId of an alarm (owned by its device's tenant, like the device)."""
    return ua.NodeId(f"device:{device_id}:alarm:{alarm_id}", ns)


def _alarm_of_condition(ns: int, nodeid: Any) -> UUID | None:
    ident = nodeid.Identifier
    if nodeid.NamespaceIndex != ns or not isinstance(ident, str) or ":alarm:" not in ident:
        return None
    with contextlib.suppress(ValueError):
        return UUID(ident.rsplit(":alarm:", 1)[1])
    return None


def _ms(ts: int | None) -> datetime:
    return datetime.fromtimestamp((ts or 0) / 1000, UTC)


def _alarms_and_devices(event: LiveEvent) -> bool:
    """The bus events this component follows."""
    return isinstance(event, DeviceEvent) or (
        isinstance(event, RecordEvent) and event.topic == "alarm"
    )


class OpcUaAlarms:
    """Alarm conditions of the platform's OPC UA server."""

    def __init__(self, server: Server, ns: int, services: Services) -> None:
        """Attach to a built (not yet started) server."""
        self._server = server
        self._ns = ns
        self._services = services
        self._generators: dict[UUID, Any] = {}
        self._conditions: dict[UUID, UUID] = {}  # alarm -> device, of existing nodes
        self._event_ids: OrderedDict[bytes, UUID] = OrderedDict()
        self._queue: asyncio.Queue[LiveEvent] | None = None
        self._task: asyncio.Task[None] | None = None
        self._later: set[asyncio.Task[None]] = set()
        self._template: Any = None

    async def start(self) -> None:
        """Bind `Acknowledge`, create the retained alarms' conditions, follow changes."""
        alarms = self._services.alarms
        if alarms is None:
            return
        self._server.link_method(self._server.get_node(ua.NodeId(_ACKNOWLEDGE)), self._acknowledge)
        self._queue = self._services.bus.subscribe(wants=_alarms_and_devices)
        template = await events.get_event_obj_from_type_node(
            self._server.get_node(ua.NodeId(ua.ObjectIds.AlarmConditionType))
        )
        template.add_property("NodeId", None, ua.VariantType.NodeId)  # the ConditionId
        self._template = template
        await self._notify_on_every_device()
        retained = (AlarmStatus.ACTIVE_UNACK, AlarmStatus.ACTIVE_ACK, AlarmStatus.CLEARED_UNACK)
        try:
            page = await alarms.list(None, AlarmFilter(statuses=retained), _RETAINED_AT_START, 0)
        except IIoTError as exc:
            log.warning("OPC UA alarms: retained alarms not loaded: %s", exc)
        else:
            for alarm in page.items:
                await self._ensure_condition(alarm.device_id, alarm.id, alarm.type)
        self._task = asyncio.create_task(self._follow(), name="opcua-alarms")

    async def stop(self) -> None:
        """Stop following alarm changes."""
        await cancel_and_wait(self._task)
        self._task = None
        for task in self._later:
            task.cancel()
        if self._queue is not None:
            self._services.bus.unsubscribe(self._queue)
            self._queue = None

    async def _follow(self) -> None:
        assert self._queue is not None
        while True:
            event = await self._queue.get()
            try:
                if isinstance(event, RecordEvent) and event.topic == "alarm":
                    await self._fire(event)
                elif isinstance(event, DeviceEvent) and event.kind == "created":
                    self._later.add(asyncio.create_task(self._notify_when_built(event.device.id)))
                    self._later = {t for t in self._later if not t.done()}
                elif isinstance(event, DeviceEvent) and event.kind == "deleted":
                    self._generators.pop(event.device.id, None)
                    for alarm_id in [
                        a for a, d in self._conditions.items() if d == event.device.id
                    ]:
                        del self._conditions[alarm_id]
            except Exception:  # one bad event must not stop the others
                log.exception("OPC UA alarms: cannot publish an alarm event")

    async def _notify_on_every_device(self) -> None:
        """Let clients subscribe to events on every device object (EventNotifier)."""
        offset = 0
        while True:
            page = await self._services.store.list_devices(None, _DEVICE_PAGE, offset)
            for device in page.items:
                await self._set_notifier(device.id)
            offset += len(page.items)
            if not page.items or offset >= page.total:
                return

    async def _set_notifier(self, device_id: UUID) -> bool:
        node = self._server.get_node(ids.device_node(self._ns, device_id))
        try:
            await node.set_event_notifier([ua.EventNotifier.SubscribeToEvents])
        except ua.UaStatusCodeError:
            return False  # not in the address space (yet)
        return True

    async def _notify_when_built(self, device_id: UUID) -> None:
        # The address space sync adds the device's node from the same live event.
        for _ in range(100):
            if await self._set_notifier(device_id):
                return
            await asyncio.sleep(0.05)

    async def _ensure_condition(self, device_id: UUID, alarm_id: UUID, name: str) -> bool:
        if alarm_id in self._conditions:
            return True
        device = self._server.get_node(ids.device_node(self._ns, device_id))
        try:
            await device.add_object(
                condition_node(self._ns, device_id, alarm_id), f"{self._ns}:{name}"
            )
        except ua.UaStatusCodeError as exc:  # the device is not (or no longer) in the space
            log.debug("OPC UA alarms: no condition for alarm %s: %s", alarm_id, exc)
            return False
        self._conditions[alarm_id] = device_id
        return True

    async def _drop_condition(self, alarm_id: UUID) -> None:
        device_id = self._conditions.pop(alarm_id, None)
        if device_id is not None:
            node = self._server.get_node(condition_node(self._ns, device_id, alarm_id))
            with contextlib.suppress(ua.UaStatusCodeError):
                await self._server.delete_nodes([node])

    async def _generator(self, device_id: UUID) -> Any:
        generator = self._generators.get(device_id)
        if generator is None:
            generator = EventGenerator(self._server.iserver.isession)
            await generator.init(
                copy.deepcopy(self._template), emitting_node=ids.device_node(self._ns, device_id)
            )
            self._generators[device_id] = generator
        return generator

    async def _fire(self, record: RecordEvent) -> None:
        data = record.data
        alarm_id, device_id = UUID(str(data["id"])), UUID(str(data["device_id"]))
        status = str(data["status"])
        active, acked = status.startswith("ACTIVE"), status.endswith("_ACK")
        retain = status != AlarmStatus.CLEARED_ACK
        if retain and not await self._ensure_condition(device_id, alarm_id, str(data["type"])):
            return
        try:
            generator = await self._generator(device_id)
        except ua.UaStatusCodeError:
            return  # the device's node is gone
        event = generator.event
        event.ConditionName = str(data["type"])
        event.NodeId = condition_node(self._ns, device_id, alarm_id)
        event.Severity = _SEVERITY.get(str(data["severity"]), 100)
        event.Retain = retain
        event.Message = ua.LocalizedText(f"{data['type']} {data['severity']} {status}")
        event.ClientUserId = data.get("ack_by") or ""
        setattr(event, "EnabledState/Id", True)
        event.EnabledState = ua.LocalizedText("Enabled")
        setattr(event, "ActiveState/Id", active)
        event.ActiveState = ua.LocalizedText("Active" if active else "Inactive")
        setattr(event, "AckedState/Id", acked)
        event.AckedState = ua.LocalizedText("Acknowledged" if acked else "Unacknowledged")
        changed = {"raised": data.get("start_ts"), "acked": data.get("ack_ts")}
        when = changed.get(record.kind) or data.get("clear_ts") or data.get("end_ts")
        await generator.trigger(time_attr=_ms(when))
        self._remember(
            event.EventId.Value if hasattr(event.EventId, "Value") else event.EventId, alarm_id
        )
        if not retain:
            await self._drop_condition(alarm_id)

    def _remember(self, event_id: bytes, alarm_id: UUID) -> None:
        self._event_ids[bytes(event_id)] = alarm_id
        while len(self._event_ids) > _EVENT_IDS:
            self._event_ids.popitem(last=False)

    async def _acknowledge(self, parent: Any, *args: Any) -> Any:
        """`Acknowledge(EventId, Comment)` on a condition (or on a device with an EventId)."""
        user = CURRENT_USER.get()
        if user is None or user.platform_role is None:
            return ua.StatusCode(ua.StatusCodes.BadUserAccessDenied)
        alarm_id = _alarm_of_condition(self._ns, parent)
        if alarm_id is None and args:
            raw = args[0].Value if isinstance(args[0], ua.Variant) else args[0]
            if isinstance(raw, bytes):
                alarm_id = self._event_ids.get(raw)
        if alarm_id is None:
            return ua.StatusCode(ua.StatusCodes.BadEventIdUnknown)
        alarms = self._services.alarms
        assert alarms is not None
        try:
            alarm = await alarms.get(user.tenant_id, alarm_id)
            if alarm.acknowledged:
                return ua.StatusCode(ua.StatusCodes.BadConditionBranchAlreadyAcked)
            await alarms.ack(user.tenant_id, alarm_id, user.name or "opcua")
        except NotFound:
            return ua.StatusCode(ua.StatusCodes.BadEventIdUnknown)
        except IIoTError:
            return ua.StatusCode(ua.StatusCodes.BadResourceUnavailable)
        log.info("OPC UA: %s acknowledged alarm %s", user.name, alarm_id)
        return []
