"""OPC UA nodes for device control: `SendCommand` on every device object, and the
device's client and shared attributes as read-only properties.

`SendCommand(Method: String, Params: String) -> (Status: String, Response: String)` sends a
lightweight two-way command through the command service and waits like the REST call
(10 s): SCADA can command any device, whatever protocol the device uses. `Params` is JSON
text (empty: `{}`); `Response` is the device's answer as JSON text (empty when none came).

Attributes appear as properties `client:{key}` and `shared:{key}` whose value is the JSON
text of the attribute, kept current from the live bus. Node ids start with `device:{id}:`,
so the tenant access rules of the address space apply to them unchanged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from asyncua import ua as _ua
from asyncua.server.server import Server

from iiot.adapters import opcua_ids as ids
from iiot.adapters.opcua_access import CURRENT_USER
from iiot.bus import DeviceEvent, LiveEvent, RecordEvent, TelemetryEvent
from iiot.control.rules import CommandRequest
from iiot.errors import IIoTError, NotFound, StorageUnavailable
from iiot.services import Services

__all__ = ["CommandNodes", "send_command_node"]

ua: Any = _ua
log = logging.getLogger(__name__)

_WAIT_S = 10.0
_PAGE = 500
_SHOWN_SCOPES = ("client", "shared")


def send_command_node(ns: int, device_id: UUID) -> Any:
    """A device's `SendCommand` method."""
    return ua.NodeId(f"device:{device_id}:SendCommand", ns)


def _attribute_node(ns: int, device_id: UUID, scope: str, key: str) -> Any:
    return ua.NodeId(f"device:{device_id}:attribute:{scope}:{key}", ns)


def _argument(name: str, description: str) -> Any:
    return ua.Argument(
        Name=name,
        DataType=ua.NodeId(ua.ObjectIds.String),
        ValueRank=ua.ValueRank.Scalar,
        Description=ua.LocalizedText(description),
    )


def _args_property(nodeid: Any, name: str, parent: Any, arguments: list[Any]) -> Any:
    attrs = ua.VariableAttributes()
    attrs.DisplayName = ua.LocalizedText(name)
    attrs.DataType = ua.NodeId(ua.ObjectIds.Argument)
    attrs.Value = ua.Variant(arguments, ua.VariantType.ExtensionObject)
    attrs.ValueRank = ua.ValueRank.OneDimension
    attrs.ArrayDimensions = [0]
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


def _method(nodeid: Any, ns: int, parent: Any) -> Any:
    attrs = ua.MethodAttributes()
    attrs.DisplayName = ua.LocalizedText("SendCommand")
    attrs.Description = ua.LocalizedText("Send a two-way command to the device and wait")
    attrs.Executable = True
    attrs.UserExecutable = True
    return ua.AddNodesItem(
        RequestedNewNodeId=nodeid,
        BrowseName=ua.QualifiedName("SendCommand", ns),
        NodeClass=ua.NodeClass.Method,
        ParentNodeId=parent,
        ReferenceTypeId=ua.NodeId(ua.ObjectIds.HasComponent),
        NodeAttributes=attrs,
    )


def _attribute_property(nodeid: Any, name: str, ns: int, parent: Any, text: str) -> Any:
    attrs = ua.VariableAttributes()
    attrs.DisplayName = ua.LocalizedText(name)
    attrs.DataType = ua.NodeId(ua.ObjectIds.String)
    attrs.Value = ua.Variant(text, ua.VariantType.String)
    attrs.ValueRank = ua.ValueRank.Scalar
    attrs.AccessLevel = ua.AccessLevel.CurrentRead.mask
    attrs.UserAccessLevel = ua.AccessLevel.CurrentRead.mask
    return ua.AddNodesItem(
        RequestedNewNodeId=nodeid,
        BrowseName=ua.QualifiedName(name, ns),
        NodeClass=ua.NodeClass.Variable,
        ParentNodeId=parent,
        ReferenceTypeId=ua.NodeId(ua.ObjectIds.HasProperty),
        TypeDefinition=ua.NodeId(ua.ObjectIds.PropertyType),
        NodeAttributes=attrs,
    )


class CommandNodes:
    """Adds and maintains the control nodes of the devices the address space shows."""

    def __init__(self, server: Server, ns: int, services: Services) -> None:
        """Nodes go through asyncua's internal session, as the rest of the address space."""
        self._session = server.iserver.isession
        self._ns = ns
        self._services = services
        self._devices: dict[UUID, UUID] = {}  # device -> tenant
        self._attributes: dict[UUID, set[tuple[str, str]]] = {}

    async def build(self) -> None:
        """Nodes for every device in the store."""
        offset = 0
        while True:
            page = await self._services.store.list_devices(None, _PAGE, offset)
            for device in page.items:
                await self._add_device(device.id, device.tenant_id)
            offset += len(page.items)
            if not page.items or offset >= page.total:
                break

    async def apply(self, event: LiveEvent) -> None:
        """Follow device and attribute changes (after the address space applied them)."""
        if isinstance(event, TelemetryEvent):
            for item in event.batch:
                if item.device.id not in self._devices:
                    await self._add_device(item.device.id, item.device.tenant_id)
        elif isinstance(event, DeviceEvent):
            if event.kind == "deleted":
                await self._remove_device(event.device.id)
            elif event.device.id not in self._devices:
                await self._add_device(event.device.id, event.device.tenant_id)
        elif (
            isinstance(event, RecordEvent)
            and event.topic == "attributes"
            and event.device_id in self._devices
            and event.kind in _SHOWN_SCOPES
        ):
            await self._update_attributes(event.device_id, event.kind, event.data)

    async def _add(self, items: list[Any]) -> None:
        results = await self._session.add_nodes(items)
        for item, result in zip(items, results, strict=True):
            code = result.StatusCode
            if not code.is_good() and code.value != ua.StatusCodes.BadNodeIdExists:
                log.warning("OPC UA: cannot add node %s: %s", item.RequestedNewNodeId, code.name)

    async def _add_device(self, device_id: UUID, tenant_id: UUID) -> None:
        ns = self._ns
        obj = ids.device_node(ns, device_id)
        method = send_command_node(ns, device_id)
        await self._add(
            [
                _method(method, ns, obj),
                _args_property(
                    ua.NodeId(f"device:{device_id}:SendCommand:InputArguments", ns),
                    "InputArguments",
                    method,
                    [
                        _argument("Method", "the command's method, e.g. setValve"),
                        _argument("Params", 'its parameters as JSON, e.g. {"open": true}'),
                    ],
                ),
                _args_property(
                    ua.NodeId(f"device:{device_id}:SendCommand:OutputArguments", ns),
                    "OutputArguments",
                    method,
                    [
                        _argument("Status", "the command's state, SUCCESSFUL when answered"),
                        _argument("Response", "the device's answer as JSON"),
                    ],
                ),
            ]
        )
        self._session.add_method_callback(method, self._callback(device_id))
        self._devices[device_id] = tenant_id
        try:
            found = await self._services.store.control.get_attributes(
                None, device_id, _SHOWN_SCOPES, None
            )
        except (NotFound, StorageUnavailable):
            return
        for scope, values in found.items():
            data = {"values": {k: v.value for k, v in values.items()}, "deleted": []}
            await self._update_attributes(device_id, scope, data)

    async def _update_attributes(self, device_id: UUID, scope: str, data: Any) -> None:
        ns = self._ns
        known = self._attributes.setdefault(device_id, set())
        new: list[Any] = []
        for key, value in dict(data.get("values", {})).items():
            nodeid = _attribute_node(ns, device_id, scope, key)
            text = json.dumps(value)
            if (scope, key) in known:
                await self._session.write(
                    ua.WriteParameters(
                        NodesToWrite=[
                            ua.WriteValue(
                                NodeId=nodeid,
                                AttributeId=ua.AttributeIds.Value,
                                Value=ua.DataValue(ua.Variant(text, ua.VariantType.String)),
                            )
                        ]
                    )
                )
            else:
                known.add((scope, key))
                new.append(
                    _attribute_property(
                        nodeid, f"{scope}:{key}", ns, ids.device_node(ns, device_id), text
                    )
                )
        if new:
            await self._add(new)
        gone = [k for k in data.get("deleted", []) if (scope, k) in known]
        if gone:
            await self._delete([_attribute_node(ns, device_id, scope, k) for k in gone])
            known.difference_update((scope, k) for k in gone)

    async def _delete(self, nodes: list[Any]) -> None:
        params = ua.DeleteNodesParameters(
            NodesToDelete=[ua.DeleteNodesItem(NodeId=n, DeleteTargetReferences=True) for n in nodes]
        )
        await self._session.delete_nodes(params)

    async def _remove_device(self, device_id: UUID) -> None:
        if self._devices.pop(device_id, None) is None:
            return
        ns = self._ns
        nodes = [
            _attribute_node(ns, device_id, s, k) for s, k in self._attributes.pop(device_id, set())
        ]
        nodes += [
            ua.NodeId(f"device:{device_id}:SendCommand:InputArguments", ns),
            ua.NodeId(f"device:{device_id}:SendCommand:OutputArguments", ns),
            send_command_node(ns, device_id),
        ]
        await self._delete(nodes)

    def _callback(self, device_id: UUID) -> Any:
        async def send_command(parent: Any, *args: Any) -> Any:
            return await self._send(device_id, parent, args)

        return send_command

    async def _send(self, device_id: UUID, parent: Any, args: Sequence[Any]) -> Any:
        """Check the caller and the arguments, send, wait, answer (Status, Response)."""
        if parent != ids.device_node(self._ns, device_id):
            return ua.StatusCode(ua.StatusCodes.BadMethodInvalid)
        tenant = self._devices.get(device_id)
        if tenant is None:
            return ua.StatusCode(ua.StatusCodes.BadNodeIdUnknown)
        user = CURRENT_USER.get()
        if user is None or not user.can_change(tenant):
            return ua.StatusCode(ua.StatusCodes.BadUserAccessDenied)
        values = [a.Value if isinstance(a, ua.Variant) else a for a in args]
        if len(values) != 2 or not all(isinstance(v, str) for v in values):
            return ua.StatusCode(ua.StatusCodes.BadInvalidArgument)
        method, params_text = values
        try:
            params = json.loads(params_text) if params_text.strip() else {}
        except ValueError:
            return ua.StatusCode(ua.StatusCodes.BadInvalidArgument)
        services = self._services
        try:
            device = await services.store.get_device(None, device_id)
            sender = await services.store.find_user(user.name) if user.name else None
            command = await services.commands.send(
                None,
                device,
                CommandRequest(method, params, timeout_ms=int(_WAIT_S * 1000)),
                sender.id if sender else None,
            )
            command = await services.commands.wait(None, command, _WAIT_S, fresh=True)
        except NotFound:
            return ua.StatusCode(ua.StatusCodes.BadNodeIdUnknown)
        except StorageUnavailable:
            return ua.StatusCode(ua.StatusCodes.BadResourceUnavailable)
        except IIoTError:
            return ua.StatusCode(ua.StatusCodes.BadInvalidArgument)
        response = "" if command.response is None else json.dumps(command.response)
        log.info(
            "OPC UA: %s sent %r to device %s: %s", user.name, method, device_id, command.status
        )
        return [
            ua.Variant(command.status, ua.VariantType.String),
            ua.Variant(response, ua.VariantType.String),
        ]
