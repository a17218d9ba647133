"""Commands and attributes through the external MQTT broker (`IIOT_MQTT_URL`), our topics.

- Commands: published at QoS 1 to `devices/{id}/commands/{command_id}` as
  `{"method", "params"}`; the device replies with any JSON on
  `devices/{id}/commands/{command_id}/reply`.
- Shared attributes: every change is published at QoS 1 to `devices/{id}/attributes/shared`
  (`{key: value}`; deleted keys as `{"deleted": [keys]}`).
- Client attributes: the device publishes `devices/{id}/attributes`; requests on
  `devices/{id}/attributes/request/{n}` are answered on `devices/{id}/attributes/response/{n}`.

The broker's PUBACK only says the *broker* took the command, not that a device got it, so
commands sent this way stay SENT until the device replies (its reply proves delivery);
DELIVERED cannot be proven here. A persistent command the device does not answer is sent
again (same id) after each `timeout_ms` until it expires. Every device is reachable through
the broker, so each one has a link here from start (or creation) to deletion.

The broker authenticates devices and enforces the topic ACL (as for telemetry); its own
connection uses a client id of its own (`{telemetry client id}-control`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Mapping, Sequence
from typing import Any, Self
from uuid import UUID

import mqtt5

from iiot.adapters.mqtt import SESSION_EXPIRY_S
from iiot.adapters.mqtt_session import MqttError, MqttSession, Publish
from iiot.adapters.mqtt_shared import _BrokerUrl, _default_client_id
from iiot.bus import DeviceEvent, LiveEvent, RecordEvent
from iiot.errors import IIoTError
from iiot.links import DeliveryFailed, OutboundCommand
from iiot.model import Device
from iiot.services import Services
from iiot.supervisor import Backoff, cancel_and_wait

__all__ = ["MqttCommandChannel", "MqttExternalLink"]

log = logging.getLogger(__name__)

FILTERS = (
    "devices/+/commands/+/reply",
    "devices/+/attributes",
    "devices/+/attributes/request/+",
)
_PAGE = 500
_KEEPALIVE_S = 30


def _devices_and_attributes(event: LiveEvent) -> bool:
    """The bus events this component follows."""
    return isinstance(event, DeviceEvent) or (
        isinstance(event, RecordEvent) and event.topic == "attributes"
    )


class MqttExternalLink:
    """A device reached through the external broker: publish, never a proof of delivery."""

    protocol = "mqtt-external"
    confirms_delivery = False  # other links of the device are preferred
    listens_commands = True
    listens_attributes = False  # shared changes are published by the channel itself

    def __init__(self, device_id: UUID, channel: MqttCommandChannel) -> None:
        """One device's way through the channel's connection."""
        self.device_id = device_id
        self._channel = channel

    async def deliver_command(self, command: OutboundCommand) -> bool:
        """Publish at QoS 1: False (the broker's PUBACK is not the device's)."""
        body = {"method": command.method, "params": command.params}
        await self._channel.publish(f"devices/{self.device_id}/commands/{command.id}", body)
        return False

    async def deliver_attributes(self, shared: Mapping[str, Any], deleted: Sequence[str]) -> None:
        """Not used: the channel publishes shared changes for every device."""


class MqttCommandChannel:
    """Its own broker connection for commands, replies and attributes."""

    name = "mqtt-commands"

    def __init__(self, services: Services) -> None:
        """Nothing connects before `__aenter__`."""
        self._services = services
        self._url = _BrokerUrl(services.settings.mqtt_url or "")
        base = self._url.client_id or _default_client_id(services)
        self._client_id = f"{base}-control"
        self._tls = ssl.create_default_context(cafile=self._url.ca_file) if self._url.tls else None
        self._session: MqttSession | None = None
        self._links: dict[UUID, MqttExternalLink] = {}
        self._runner: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[LiveEvent] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def describe(self) -> str:
        """One line for the start-up log."""
        return f"MQTT commands via {self._url} (client id {self._client_id})"

    async def __aenter__(self) -> Self:
        self._queue = self._services.bus.subscribe(wants=_devices_and_attributes)
        offset = 0
        while True:
            page = await self._services.store.list_devices(None, _PAGE, offset)
            for device in page.items:
                self._attach(device)
            offset += len(page.items)
            if not page.items or offset >= page.total:
                break
        self._watcher = asyncio.create_task(self._watch(), name="mqtt-commands-events")
        self._runner = asyncio.create_task(self._keep_connected(), name="mqtt-commands")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._queue is not None:
            self._services.bus.unsubscribe(self._queue)
        await cancel_and_wait(self._watcher)
        await cancel_and_wait(self._runner)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for device_id, link in list(self._links.items()):
            self._services.links.detach(device_id, link)
        self._links.clear()
        session, self._session = self._session, None
        if session is not None:
            await session.disconnect()

    # --- links ---------------------------------------------------------------------------
    def _attach(self, device: Device) -> None:
        if device.id not in self._links:
            link = MqttExternalLink(device.id, self)
            self._links[device.id] = link
            self._services.links.attach(device, link)

    def _detach(self, device_id: UUID) -> None:
        link = self._links.pop(device_id, None)
        if link is not None:
            self._services.links.detach(device_id, link)

    async def _watch(self) -> None:
        assert self._queue is not None
        while True:
            event = await self._queue.get()
            if isinstance(event, DeviceEvent):
                if event.kind == "deleted":
                    self._detach(event.device.id)
                else:
                    self._attach(event.device)
            elif (
                isinstance(event, RecordEvent)
                and event.topic == "attributes"
                and event.kind == "shared"
                and event.device_id is not None
            ):
                update: dict[str, Any] = dict(event.data.get("values", {}))
                if event.data.get("deleted"):
                    update = {"deleted": list(event.data["deleted"])}
                self._spawn(
                    self._publish_quietly(f"devices/{event.device_id}/attributes/shared", update)
                )

    # --- connection ----------------------------------------------------------------------
    async def _keep_connected(self) -> None:
        backoff = Backoff(initial_s=1, max_s=30)
        while True:
            try:
                session = await self._open()
            except (OSError, MqttError) as exc:
                log.warning("MQTT commands: %s unavailable: %s", self._url, exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            reason = await session.closed
            self._session = None
            log.warning("MQTT commands: connection to %s ended: %s", self._url, reason)
            await asyncio.sleep(backoff.next_delay())

    async def _open(self) -> MqttSession:
        url = self._url
        connect = mqtt5.ConnectPacket(
            self._client_id,
            username=url.username,
            password=None if url.password is None else url.password.encode(),
            clean_start=False,  # replies sent while we were away wait on the broker
            keep_alive=_KEEPALIVE_S,
            session_expiry_interval=SESSION_EXPIRY_S,
        )
        session, _ = await MqttSession.connect(
            url.host, url.port, connect, self._received, tls=self._tls
        )
        try:
            for pattern in FILTERS:
                granted = await session.subscribe(pattern, qos=1)
                if granted.value >= 0x80:
                    raise MqttError(f"broker refused the subscription to {pattern}")
        except MqttError:
            session.abort("no subscription")
            raise
        self._session = session
        return session

    async def publish(self, topic: str, body: Any) -> None:
        """Publish JSON at QoS 1 and wait for the broker's PUBACK; `DeliveryFailed` if not."""
        session = self._session
        if session is None:
            raise DeliveryFailed(f"the MQTT broker {self._url} is not connected")
        try:
            reason = await session.publish(topic, json.dumps(body).encode())
        except (MqttError, OSError) as exc:
            raise DeliveryFailed(f"MQTT publish failed: {exc}") from exc
        if reason.value >= 0x80:
            raise DeliveryFailed(f"the broker refused the publish: {reason.name}")

    async def _publish_quietly(self, topic: str, body: Any) -> None:
        try:
            await self.publish(topic, body)
        except DeliveryFailed as exc:
            log.info("MQTT commands: %s not published: %s", topic, exc)

    # --- from devices --------------------------------------------------------------------
    def _received(self, session: MqttSession, message: Publish) -> None:
        self._spawn(self._handle(session, message))

    async def _handle(self, session: MqttSession, message: Publish) -> None:
        parts = message.topic.split("/")
        try:
            device = await self._services.registry.get(UUID(parts[1]))
            inbox = self._services.inbox
            body = json.loads(message.payload) if message.payload.strip() else None
            if len(parts) == 5 and parts[2] == "commands" and parts[4] == "reply":
                await inbox.command_reply(device, UUID(parts[3]), body)
            elif len(parts) == 3 and parts[2] == "attributes":
                await inbox.report_attributes(device, body if isinstance(body, dict) else {})
            elif len(parts) == 5 and parts[3] == "request":
                request = body if isinstance(body, dict) else {}
                answer = await inbox.request_attributes(
                    device, _keys(request.get("clientKeys")), _keys(request.get("sharedKeys"))
                )
                await self.publish(f"devices/{device.id}/attributes/response/{parts[4]}", answer)
        except (IIoTError, ValueError, IndexError) as exc:
            log.info("MQTT commands: %s refused: %s", message.topic, exc)
        finally:
            if message.packet_id:
                session.ack(message.packet_id)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _keys(text: Any) -> list[str] | None:
    if not isinstance(text, str):
        return None
    keys = [k.strip() for k in text.split(",") if k.strip()]
    return keys or None
