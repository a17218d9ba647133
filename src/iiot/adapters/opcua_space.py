"""The OPC UA address space of the platform: `Objects/Tenants/{tenant}/{device}/...`.

Built once from the store at start, then kept up to date from the live bus: telemetry sets
the variables' latest values (SourceTimestamp = the point's ts; coalesced, see
`opcua_live`), new keys become new variables, device and tenant changes rename, re-status or
delete nodes. Nodes are added in batches through asyncua's internal session and values
written straight into its address space, the cheapest path asyncua offers.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from asyncua import ua as _ua
from asyncua.server.server import Server

from iiot.adapters import opcua_ids as ids
from iiot.adapters.opcua_access import NodeOwners
from iiot.adapters.opcua_live import LiveVariable, variant_type
from iiot.bus import DeviceEvent, LiveEvent, TelemetryEvent, TenantEvent
from iiot.errors import NotFound
from iiot.model import Device, Point, Tenant
from iiot.storage.base import Store

__all__ = ["AddressSpaceSync", "MethodCallback"]

# asyncua's `ua` types are generated NewTypes that mypy cannot follow; treat them as Any.
ua: Any = _ua

log = logging.getLogger(__name__)

MethodCallback = Callable[..., Awaitable[Any]]

_PAGE = 500
_READ_HISTORY = ua.AccessLevel.CurrentRead.mask | ua.AccessLevel.HistoryRead.mask


@dataclass(slots=True)
class _DeviceState:
    tenant_id: UUID
    name: str
    status: str
    keys: dict[str, LiveVariable] = field(default_factory=dict)


class AddressSpaceSync:
    """Creates, updates and removes the platform's nodes."""

    def __init__(
        self,
        server: Server,
        ns: int,
        store: Store,
        owners: NodeOwners,
        set_status: Callable[[UUID], MethodCallback],
    ) -> None:
        self._server = server
        self._session = server.iserver.isession
        self._ns = ns
        self._store = store
        self._owners = owners
        self._set_status = set_status
        self._tenants: set[UUID] = set()
        self._devices: dict[UUID, _DeviceState] = {}
        self._changed: list[LiveVariable] = []  # newer values since the last publish
        self.folder = ua.NodeId(ids.TENANTS_FOLDER, ns)

    def device_tenant(self, device_id: UUID) -> UUID | None:
        """The tenant of a device the address space holds."""
        state = self._devices.get(device_id)
        return state.tenant_id if state else None

    # --- start -------------------------------------------------------------------------
    async def build(self) -> None:
        """Create `Tenants` and every tenant, device and latest value from the store."""
        await self._add(
            [
                _object(
                    self.folder,
                    ids.TENANTS_FOLDER,
                    self._ns,
                    ua.NodeId(ua.ObjectIds.ObjectsFolder),
                    ua.ObjectIds.Organizes,
                    ua.ObjectIds.FolderType,
                )
            ]
        )
        offset = 0
        while True:
            tenants = await self._store.list_tenants(None, _PAGE, offset)
            for tenant in tenants.items:
                await self._add_tenant(tenant)
            offset += len(tenants.items)
            if not tenants.items or offset >= tenants.total:
                break
        offset = 0
        while True:
            devices = await self._store.list_devices(None, _PAGE, offset)
            for device in devices.items:
                await self._add_device(device)
                try:
                    latest = await self._store.latest(None, device.id)
                except NotFound:
                    continue  # deleted meanwhile; its event will follow
                new = self._offer(self._devices[device.id], latest.values())
                await self._add_variables(device.id, self._devices[device.id], new)
            offset += len(devices.items)
            if not devices.items or offset >= devices.total:
                break

    # --- live events -------------------------------------------------------------------
    async def apply(self, event: LiveEvent) -> None:
        """Bring the address space in line with one live event."""
        if isinstance(event, TelemetryEvent):
            devices = self._devices
            for item in event.batch:
                if not item.points:
                    continue
                state = devices.get(item.device.id)
                if state is None:
                    if not await self._ensure_device(item.device):
                        continue
                    state = devices[item.device.id]
                new = self._offer(state, item.points)
                if new:
                    await self._add_variables(item.device.id, state, new)
            return
        if isinstance(event, TenantEvent):
            if event.kind == "deleted":
                await self._remove_tenant(event.tenant.id)
            elif event.tenant.id in self._tenants:
                await self._rename(ids.tenant_node(self._ns, event.tenant.id), event.tenant.name)
            return
        if not isinstance(event, DeviceEvent):
            return  # commands, alarms, attributes: not mirrored here (yet)
        device = event.device
        if event.kind == "deleted":
            await self._remove_device(device.id)
        elif not await self._ensure_device(device):
            return
        elif event.kind == "updated":
            await self._update_device(device)

    async def _ensure_device(self, device: Device) -> bool:
        if device.id in self._devices:
            return True
        if device.tenant_id not in self._tenants:
            try:
                tenant = await self._store.get_tenant(None, device.tenant_id)
            except NotFound:
                return False  # the tenant is gone: so is the device
            await self._add_tenant(tenant)
        await self._add_device(device)
        return True

    # --- nodes -------------------------------------------------------------------------
    async def _add(self, items: list[ua.AddNodesItem]) -> None:
        results = await self._session.add_nodes(items)
        for item, result in zip(items, results, strict=True):
            code = result.StatusCode
            if not code.is_good() and code.value != ua.StatusCodes.BadNodeIdExists:
                log.warning("OPC UA: cannot add node %s: %s", item.RequestedNewNodeId, code.name)

    async def _add_tenant(self, tenant: Tenant) -> None:
        node = ids.tenant_node(self._ns, tenant.id)
        await self._add(
            [
                _object(
                    node,
                    tenant.name,
                    self._ns,
                    self.folder,
                    ua.ObjectIds.Organizes,
                    ua.ObjectIds.FolderType,
                )
            ]
        )
        self._tenants.add(tenant.id)

    async def _add_device(self, device: Device) -> None:
        ns, did = self._ns, device.id
        self._owners.device_tenants[did] = device.tenant_id
        obj = ids.device_node(ns, did)
        method = ids.method_node(ns, did)
        argument = ua.Argument(
            Name="status",
            DataType=ua.NodeId(ua.ObjectIds.String),
            ValueRank=ua.ValueRank.Scalar,
            Description=ua.LocalizedText("the new status, e.g. active, maintenance, disabled"),
        )
        await self._add(
            [
                _object(
                    obj,
                    device.name,
                    ns,
                    ids.tenant_node(ns, device.tenant_id),
                    ua.ObjectIds.Organizes,
                    ua.ObjectIds.BaseObjectType,
                ),
                _variable(
                    ids.status_node(ns, did),
                    "Status",
                    ns,
                    obj,
                    _status_value(device.status),
                    ua.AccessLevel.CurrentRead.mask,
                ),
                _method(method, "SetStatus", ns, obj),
                _property(
                    ids.args_node(ns, did),
                    "InputArguments",
                    method,
                    ua.Variant([argument], ua.VariantType.ExtensionObject),
                    ua.NodeId(ua.ObjectIds.Argument),
                ),
            ]
        )
        await self._write(ids.status_node(ns, did), _status_value(device.status))
        self._session.add_method_callback(method, self._set_status(did))
        self._devices[did] = _DeviceState(device.tenant_id, device.name, device.status)

    async def _update_device(self, device: Device) -> None:
        state = self._devices[device.id]
        if device.name != state.name:
            await self._rename(ids.device_node(self._ns, device.id), device.name)
            state.name = device.name
        if device.status != state.status:
            await self._write(ids.status_node(self._ns, device.id), _status_value(device.status))
            state.status = device.status

    async def _rename(self, node: ua.NodeId, name: str) -> None:
        browse_name = ua.Variant(ua.QualifiedName(name, self._ns))
        await self._write(node, browse_name, ua.AttributeIds.BrowseName)
        await self._write(node, ua.Variant(ua.LocalizedText(name)), ua.AttributeIds.DisplayName)

    async def _remove_tenant(self, tenant_id: UUID) -> None:
        if tenant_id not in self._tenants:
            return
        # Its devices' own events normally came first; any left go with the folder.
        for device_id, state in list(self._devices.items()):
            if state.tenant_id == tenant_id:
                await self._remove_device(device_id)
        node = ids.tenant_node(self._ns, tenant_id)
        await self._session.delete_nodes(
            ua.DeleteNodesParameters(
                NodesToDelete=[ua.DeleteNodesItem(NodeId=node, DeleteTargetReferences=True)]
            )
        )
        self._tenants.discard(tenant_id)

    async def _remove_device(self, device_id: UUID) -> None:
        state = self._devices.pop(device_id, None)
        if state is None:
            return
        ns = self._ns
        for variable in state.keys.values():
            variable.attval = None  # a pending publish skips it
        nodes = [ids.telemetry_node(ns, device_id, key) for key in state.keys]
        nodes += [
            ids.args_node(ns, device_id),
            ids.method_node(ns, device_id),
            ids.status_node(ns, device_id),
            ids.device_node(ns, device_id),
        ]
        params = ua.DeleteNodesParameters(
            NodesToDelete=[ua.DeleteNodesItem(NodeId=n, DeleteTargetReferences=True) for n in nodes]
        )
        await self._session.delete_nodes(params)
        self._owners.device_tenants.pop(device_id, None)

    def _offer(self, state: _DeviceState, points: Iterable[Point]) -> dict[str, Point]:
        """Keep each variable's newest point; return the newest of keys seen the first time.

        This runs for every committed point, so it does no more than compare timestamps.
        """
        keys, changed = state.keys, self._changed
        new: dict[str, Point] = {}
        for point in points:
            variable = keys.get(point.key)
            if variable is None:
                seen = new.get(point.key)
                if seen is None or point.ts >= seen.ts:
                    new[point.key] = point
            elif point.ts >= variable.point.ts:  # else an older point arrived late
                variable.point = point
                if not variable.changed:
                    variable.changed = True
                    changed.append(variable)
        return new

    async def _add_variables(
        self, device_id: UUID, state: _DeviceState, points: dict[str, Point]
    ) -> None:
        """Create the variables of keys seen the first time, served from their newest point."""
        if not points:
            return
        obj = ids.device_node(self._ns, device_id)
        created: list[LiveVariable] = []
        items: list[ua.AddNodesItem] = []
        for key, point in points.items():
            variable = LiveVariable(ids.telemetry_node(self._ns, device_id, key), point)
            items.append(
                _variable(
                    variable.nodeid,
                    key,
                    self._ns,
                    obj,
                    variable.data_value(),
                    _READ_HISTORY,
                    historizing=True,
                )
            )
            state.keys[key] = variable
            created.append(variable)
        await self._add(items)
        aspace = self._server.iserver.aspace
        for variable in created:
            node = aspace.get(variable.nodeid)
            if node is not None:
                variable.attach(node.attributes[ua.AttributeIds.Value])

    async def publish(self) -> int:
        """Write the changed values of watched variables (notifying their subscriptions).

        Unwatched variables need no write: reads get their newest point from the read
        callback. Returns how many variables were written.
        """
        changed, self._changed = self._changed, []
        written = 0
        for variable in changed:
            variable.changed = False
            if variable.attval is None:
                continue  # removed meanwhile
            vtype = variant_type(variable.point.value)
            if vtype != variable.vtype:  # a key that changed type: its DataType follows
                await self._write(
                    variable.nodeid,
                    ua.Variant(ua.NodeId(vtype.value), ua.VariantType.NodeId),
                    ua.AttributeIds.DataType,
                )
                variable.vtype = vtype
            if variable.watched:
                attval = variable.attval
                await self._write(variable.nodeid, variable.data_value())
                variable.attach(attval)  # the write stored a value: serve it lazily again
                written += 1
        return written

    async def _write(
        self,
        nodeid: ua.NodeId,
        value: ua.DataValue | ua.Variant,
        attr: ua.AttributeIds = ua.AttributeIds.Value,
    ) -> None:
        datavalue = value if isinstance(value, ua.DataValue) else ua.DataValue(Value=value)
        await self._server.iserver.aspace.write_attribute_value(nodeid, attr, datavalue)


def _status_value(status: str) -> ua.DataValue:
    return ua.DataValue(
        Value=ua.Variant(status, ua.VariantType.String),
        SourceTimestamp=datetime.datetime.now(datetime.UTC),
        ServerTimestamp=datetime.datetime.now(datetime.UTC),
    )


def _object(
    nodeid: ua.NodeId, name: str, ns: int, parent: ua.NodeId, reference: int, type_id: int
) -> ua.AddNodesItem:
    attrs = ua.ObjectAttributes()
    attrs.DisplayName = ua.LocalizedText(name)
    attrs.EventNotifier = 0
    attrs.WriteMask = 0
    attrs.UserWriteMask = 0
    return ua.AddNodesItem(
        RequestedNewNodeId=nodeid,
        BrowseName=ua.QualifiedName(name, ns),
        NodeClass=ua.NodeClass.Object,
        ParentNodeId=parent,
        ReferenceTypeId=ua.NodeId(reference),
        TypeDefinition=ua.NodeId(type_id),
        NodeAttributes=attrs,
    )


def _variable(
    nodeid: ua.NodeId,
    name: str,
    ns: int,
    parent: ua.NodeId,
    value: ua.DataValue,
    access: int,
    historizing: bool = False,
) -> ua.AddNodesItem:
    variant = value.Value
    assert variant is not None
    attrs = ua.VariableAttributes()
    attrs.DisplayName = ua.LocalizedText(name)
    attrs.DataType = ua.NodeId(variant.VariantType.value)
    attrs.Value = variant
    attrs.ValueRank = ua.ValueRank.Scalar
    attrs.ArrayDimensions = None
    attrs.WriteMask = 0
    attrs.UserWriteMask = 0
    attrs.Historizing = historizing
    attrs.AccessLevel = access
    attrs.UserAccessLevel = access
    return ua.AddNodesItem(
        RequestedNewNodeId=nodeid,
        BrowseName=ua.QualifiedName(name, ns),
        NodeClass=ua.NodeClass.Variable,
        ParentNodeId=parent,
        ReferenceTypeId=ua.NodeId(ua.ObjectIds.HasComponent),
        TypeDefinition=ua.NodeId(ua.ObjectIds.BaseDataVariableType),
        NodeAttributes=attrs,
    )


def _property(
    nodeid: ua.NodeId, name: str, parent: ua.NodeId, variant: ua.Variant, datatype: ua.NodeId
) -> ua.AddNodesItem:
    attrs = ua.VariableAttributes()
    attrs.DisplayName = ua.LocalizedText(name)
    attrs.DataType = datatype
    attrs.Value = variant
    attrs.ValueRank = ua.ValueRank.OneDimension
    attrs.ArrayDimensions = [0]
    attrs.WriteMask = 0
    attrs.UserWriteMask = 0
    attrs.AccessLevel = ua.AccessLevel.CurrentRead.mask
    attrs.UserAccessLevel = ua.AccessLevel.CurrentRead.mask
    return ua.AddNodesItem(
        RequestedNewNodeId=nodeid,
        BrowseName=ua.QualifiedName(name, 0),
        NodeClass=ua.NodeClass.Variable,
        ParentNodeId=parent,
        ReferenceTypeId=ua.NodeId(ua.ObjectIds.HasProperty),
        TypeDefinition=ua.NodeId(ua.ObjectIds.PropertyType),
        NodeAttributes=attrs,
    )


def _method(nodeid: ua.NodeId, name: str, ns: int, parent: ua.NodeId) -> ua.AddNodesItem:
    attrs = ua.MethodAttributes()
    attrs.DisplayName = ua.LocalizedText(name)
    attrs.Description = ua.LocalizedText("Change the device's status in the platform")
    attrs.WriteMask = 0
    attrs.UserWriteMask = 0
    attrs.Executable = True
    attrs.UserExecutable = True
    return ua.AddNodesItem(
        RequestedNewNodeId=nodeid,
        BrowseName=ua.QualifiedName(name, ns),
        NodeClass=ua.NodeClass.Method,
        ParentNodeId=parent,
        ReferenceTypeId=ua.NodeId(ua.ObjectIds.HasComponent),
        NodeAttributes=attrs,
    )
