"""What the MQTT endpoint does for each topic besides a device's own telemetry.

Client attributes, attribute requests, command replies and client-side RPC go to
`services.inbox`; a request the inbox cannot answer gets an `{"error": ...}` reply on its
response topic. Gateway topics find or create the named child devices and hand their data
on as if each child had sent it. `MqttDeviceLink` is the way back: commands and shared
attribute updates published to the device (or through its gateway) at the QoS it
subscribed with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

import orjson

from iiot.adapters import mqtt_topics as t
from iiot.codec import decode_json
from iiot.errors import (
    DeviceDisabled,
    IIoTError,
    InvalidPayload,
    PermissionDenied,
    StorageUnavailable,
)
from iiot.links import DeliveryFailed, OutboundCommand
from iiot.model import Device

if TYPE_CHECKING:
    from iiot.adapters.mqtt_connection import MqttConnection
    from iiot.adapters.mqtt_server import MqttServer

__all__ = ["Actions", "MqttDeviceLink"]

log = logging.getLogger("iiot.adapters.mqtt_server")

PROTOCOL = "mqtt"
_UNSPECIFIED, _PAYLOAD_INVALID, _NOT_AUTHORIZED = 0x80, 0x99, 0x87
_DELIVERY_TIMEOUT_S = 30.0


def _json(body: bytes) -> Any:
    try:
        return decode_json(body)
    except InvalidPayload:
        raise
    except Exception as exc:  # decode_json raises InvalidPayload; belt and braces
        raise InvalidPayload(str(exc)) from exc


def _keys(raw: Any) -> list[str] | None:
    """ThingsBoard key lists: "a,b" (device API) or ["a", "b"] (gateway API)."""
    if raw is None:
        return None
    if isinstance(raw, str):
        return [key.strip() for key in raw.split(",") if key.strip()]
    if isinstance(raw, list) and all(isinstance(key, str) for key in raw):
        return list(raw)
    raise InvalidPayload("keys must be a comma-separated string or an array of strings")


def _rpc_ids(conn: MqttConnection) -> dict[int, tuple[UUID, UUID]]:
    """ThingsBoard request ids of this connection -> (device id, command id)."""
    ids: dict[int, tuple[UUID, UUID]] = conn.extra.setdefault("rpc_ids", {})
    return ids


def new_rpc_id(conn: MqttConnection, device_id: UUID, command_id: UUID) -> int:
    """A small integer request id for a command, unique on this connection."""
    ids = _rpc_ids(conn)
    next_id: int = conn.extra.get("rpc_next", 0) + 1
    conn.extra["rpc_next"] = next_id
    ids[next_id] = (device_id, command_id)
    if len(ids) > 10_000:  # replies that never came: forget the oldest
        del ids[next(iter(ids))]
    return next_id


class Actions:
    """The topic actions of one endpoint (everything but a device's own telemetry)."""

    def __init__(self, server: MqttServer) -> None:
        self.server = server
        self.services = server.services
        self._table = {
            t.ATTRIBUTES: self._attributes,
            t.ATTRIBUTE_REQUEST: self._attribute_request,
            t.COMMAND_REPLY: self._command_reply,
            t.CLIENT_RPC: self._client_rpc,
            t.GW_CONNECT: self._gw_connect,
            t.GW_DISCONNECT: self._gw_disconnect,
            t.GW_TELEMETRY: self._gw_telemetry,
            t.GW_ATTRIBUTES: self._gw_attributes,
            t.GW_ATTRIBUTE_REQUEST: self._gw_attribute_request,
            t.GW_RPC: self._gw_rpc,
        }

    async def run(self, conn: MqttConnection, found: t.Route, body: bytes) -> int:
        """Do what the topic asks; the v5 PUBACK reason code (0: success)."""
        handler = self._table[found.action]
        try:
            return await handler(conn, found, body)
        except InvalidPayload as exc:
            self.server.note("invalid_payload", f"{found.action} of {_who(conn)} refused: {exc}")
            self.services.metrics.messages_refused.labels(PROTOCOL, "invalid_payload").inc()
            return _PAYLOAD_INVALID
        except PermissionDenied as exc:
            self.server.note(found.action, f"{found.action} of {_who(conn)} refused: {exc}")
            self.services.metrics.messages_refused.labels(PROTOCOL, "forbidden").inc()
            return _NOT_AUTHORIZED
        except (DeliveryFailed, IIoTError) as exc:
            self.server.note(found.action, f"{found.action} of {_who(conn)} not done: {exc}")
            return _UNSPECIFIED

    # --- device API (ours and ThingsBoard's) ----------------------------------------------
    async def _attributes(self, conn: MqttConnection, found: t.Route, body: bytes) -> int:
        values = _json(body)
        if not isinstance(values, dict):
            raise InvalidPayload("attributes must be a JSON object")
        if values:
            await self.services.inbox.report_attributes(_device(conn), values)
        return 0

    async def _attribute_request(self, conn: MqttConnection, found: t.Route, body: bytes) -> int:
        device = _device(conn)
        topic = (
            f"{t.ours_prefix(str(device.id))}attributes/response/{found.arg}"
            if found.family == t.OURS
            else f"{t.TB_PREFIX}attributes/response/{found.arg}"
        )
        try:
            request = _json(body) if body.strip() else {}
            if not isinstance(request, dict):
                raise InvalidPayload("an attribute request must be a JSON object")
            answer: Any = await self.services.inbox.request_attributes(
                device, _keys(request.get("clientKeys")), _keys(request.get("sharedKeys"))
            )
        except Exception as exc:  # whatever the inbox raises, the device gets an answer
            answer = {"error": str(exc)}
        _reply(conn, topic, answer)
        return 0

    async def _command_reply(self, conn: MqttConnection, found: t.Route, body: bytes) -> int:
        device = _device(conn)
        response = _json(body) if body.strip() else None
        if found.family == t.OURS:
            try:
                command_id = UUID(found.arg)
            except ValueError as exc:
                raise InvalidPayload(f"{found.arg!r} is not a command id") from exc
        else:
            entry = _rpc_ids(conn).pop(int(found.arg), None) if found.arg.isdigit() else None
            if entry is None:
                raise InvalidPayload(f"no command with request id {found.arg} on this connection")
            command_id = entry[1]
        await self.services.inbox.command_reply(device, command_id, response)
        return 0

    async def _client_rpc(self, conn: MqttConnection, found: t.Route, body: bytes) -> int:
        topic = f"{t.TB_PREFIX}rpc/response/{found.arg}"
        try:
            request = _json(body)
            if not isinstance(request, dict) or not isinstance(request.get("method"), str):
                raise InvalidPayload('a request must be {"method": "...", "params": ...}')
            answer = await self.services.inbox.client_rpc(
                _device(conn), request["method"], request.get("params")
            )
        except Exception as exc:  # whatever the inbox raises, the device gets an answer
            answer = {"error": str(exc)}
        _reply(conn, topic, answer)
        return 0

    # --- gateway API ----------------------------------------------------------------------
    async def _gw_connect(self, conn: MqttConnection, found: t.Route, body: bytes) -> int:
        request = _json(body)
        name = request.get("device") if isinstance(request, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidPayload('connect needs {"device": "name"}')
        await self.server.gateway_child(conn, name, announce=True)
        return 0

    async def _gw_disconnect(self, conn: MqttConnection, found: t.Route, body: bytes) -> int:
        request = _json(body)
        name = request.get("device") if isinstance(request, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidPayload('disconnect needs {"device": "name"}')
        self.server.gateway_child_gone(conn, name)
        return 0

    async def _gw_telemetry(self, conn: MqttConnection, found: t.Route, body: bytes) -> int:
        document = _json(body)
        if not isinstance(document, dict):
            raise InvalidPayload('gateway telemetry must be {"device name": [...], ...}')
        ingestor = self.services.ingestor
        for name, data in document.items():
            child = await self.server.gateway_child(conn, name, announce=False)
            if data == {} or data == []:
                continue
            # The same payload shapes as the device API, so one decoder reads them all.
            try:
                await ingestor.ingest(child, orjson.dumps(data), PROTOCOL)
            except StorageUnavailable:
                raise
            except (InvalidPayload, DeviceDisabled) as exc:
                raise InvalidPayload(f"device {name!r}: {exc}") from exc
        return 0

    async def _gw_attributes(self, conn: MqttConnection, found: t.Route, body: bytes) -> int:
        document = _json(body)
        if not isinstance(document, dict):
            raise InvalidPayload('gateway attributes must be {"device name": {...}, ...}')
        for name, values in document.items():
            if not isinstance(values, dict):
                raise InvalidPayload(f"attributes of {name!r} must be a JSON object")
            child = await self.server.gateway_child(conn, name, announce=False)
            if values:
                await self.services.inbox.report_attributes(child, values)
        return 0

    async def _gw_attribute_request(self, conn: MqttConnection, found: t.Route, body: bytes) -> int:
        request = _json(body)
        if not isinstance(request, dict) or not isinstance(request.get("device"), str):
            raise InvalidPayload('an attribute request needs {"id": n, "device": "name", ...}')
        name = request["device"]
        answer: dict[str, Any] = {"id": request.get("id"), "device": name}
        try:
            child = await self.server.gateway_child(conn, name, announce=False)
            if "key" in request or "keys" in request:  # {"client": true, "key": "k"} form
                keys = _keys(request.get("keys", request.get("key")))
                client = bool(request.get("client"))
                values = await self.services.inbox.request_attributes(
                    child, keys if client else [], [] if client else keys
                )
                found_values = values.get("client" if client else "shared", {})
                if "key" in request:
                    answer["value"] = found_values.get(str(request["key"]))
                else:
                    answer["values"] = found_values
            else:
                answer.update(
                    await self.services.inbox.request_attributes(
                        child, _keys(request.get("client")), _keys(request.get("shared"))
                    )
                )
        except Exception as exc:  # whatever the inbox raises, the device gets an answer
            answer["error"] = str(exc)
        _reply(conn, f"{t.GATEWAY_PREFIX}attributes/response", answer)
        return 0

    async def _gw_rpc(self, conn: MqttConnection, found: t.Route, body: bytes) -> int:
        reply = _json(body)
        if not isinstance(reply, dict) or not isinstance(reply.get("device"), str):
            raise InvalidPayload('an RPC reply needs {"device": "name", "id": n, "data": ...}')
        request_id = reply.get("id")
        entry = _rpc_ids(conn).pop(request_id, None) if isinstance(request_id, int) else None
        if entry is None:
            raise InvalidPayload(f"no command with request id {request_id!r} on this connection")
        child = await self.server.gateway_child(conn, reply["device"], announce=False)
        await self.services.inbox.command_reply(child, entry[1], reply.get("data"))
        return 0


def _device(conn: MqttConnection) -> Device:
    assert conn.device is not None
    return conn.device


def _who(conn: MqttConnection) -> str:
    return f"device {conn.device.id}" if conn.device is not None else "client"


def _reply(conn: MqttConnection, topic: str, answer: Any) -> None:
    """Answer a request at the QoS the device listens with (0 when it does not say)."""
    # A device gone away asks again after reconnecting.
    with contextlib.suppress(DeliveryFailed):
        conn.send(topic, orjson.dumps(answer), conn.subscribed(topic) or 0)


class MqttDeviceLink:
    """A device (or a gateway's child) listening on an MQTT connection here."""

    protocol = PROTOCOL

    def __init__(self, conn: MqttConnection, device: Device, child: str | None = None) -> None:
        self.conn = conn
        self.device = device
        self.child = child  # the gateway's name for this device; None: the device itself
        self.listens_commands = False
        self.listens_attributes = False

    def _commands_topic(self) -> tuple[str, str] | None:
        """(family, a command topic) the device listens on, ours first."""
        if self.child is not None:
            return (t.GATEWAY, f"{t.GATEWAY_PREFIX}rpc")
        ours = f"{t.ours_prefix(str(self.device.id))}commands/x"
        if self.conn.subscribed(ours) is not None:
            return (t.OURS, ours)
        tb = f"{t.TB_PREFIX}rpc/request/1"
        if self.conn.subscribed(tb) is not None:
            return (t.TB, tb)
        return None

    def _attributes_topic(self) -> str | None:
        if self.child is not None:
            topic = f"{t.GATEWAY_PREFIX}attributes"
        else:
            topic = f"{t.ours_prefix(str(self.device.id))}attributes/shared"
            if self.conn.subscribed(topic) is None:
                topic = f"{t.TB_PREFIX}attributes"
        return topic if self.conn.subscribed(topic) is not None else None

    def refresh(self) -> bool:
        """Read the subscriptions again; whether the device listens for anything here."""
        found = self._commands_topic()
        self.listens_commands = found is not None and self.conn.subscribed(found[1]) is not None
        self.listens_attributes = self._attributes_topic() is not None
        return self.listens_commands or self.listens_attributes

    async def deliver_command(self, command: OutboundCommand) -> bool:
        """Publish the command; True once the device PUBACKed it (QoS 0: False)."""
        found = self._commands_topic()
        if found is None or self.conn.subscribed(found[1]) is None:
            raise DeliveryFailed("the device does not listen for commands on this connection")
        family, _ = found
        body: dict[str, Any] = {"method": command.method, "params": command.params}
        if family == t.OURS:
            topic = f"{t.ours_prefix(str(self.device.id))}commands/{command.id}"
        else:
            request_id = new_rpc_id(self.conn, self.device.id, command.id)
            if family == t.TB:
                topic = f"{t.TB_PREFIX}rpc/request/{request_id}"
            else:
                topic = f"{t.GATEWAY_PREFIX}rpc"
                body = {"device": self.child, "data": {"id": request_id, **body}}
        return await self._publish(topic, body)

    async def deliver_attributes(self, shared: Mapping[str, Any], deleted: Sequence[str]) -> None:
        """Publish changed (and deleted) shared attributes."""
        topic = self._attributes_topic()
        if topic is None:
            raise DeliveryFailed("the device does not listen for attributes on this connection")
        data: dict[str, Any] = dict(shared)
        if deleted:
            data["deleted"] = list(deleted)
        body = data if self.child is None else {"device": self.child, "data": data}
        await self._publish(topic, body)

    async def _publish(self, topic: str, body: Any) -> bool:
        qos = self.conn.subscribed(topic) or 0
        future = self.conn.send(topic, orjson.dumps(body), qos)
        if future is None:
            return False
        try:
            await asyncio.wait_for(asyncio.shield(future), _DELIVERY_TIMEOUT_S)
        except TimeoutError as exc:
            raise DeliveryFailed("the device did not acknowledge in time") from exc
        return True
