"""Commands to devices over AMQP (RabbitMQ), with tracked delivery.

A command goes to exchange `iiot.commands`, routing key `commands.{device_id}`, as persistent JSON
`{"id", "method", "params"}` with `correlation_id` = `message_id` = the command id and
`reply_to` = `replies.{device_id}`. It is published *mandatory* on a channel with
publisher confirms: DELIVERED means the broker confirmed it into a queue the device bound;
with no queue bound the broker returns it and the command stays QUEUED.

Devices reply to exchange `iiot`, routing key `replies.{device_id}`, with their `token`
header, the command id as `correlation_id` and any JSON body. A message there without a
`correlation_id` is a device saying "I listen now" (after binding its queue on every
(re)connect): its queued commands follow at once.

The platform holds an AMQP link for a device while the device is known to have a bound
queue: from its "I listen" message or from a confirmed command, until a command comes back
unroutable. When a command is queued for a device without a link here, the link is tried
once (a returned command just goes back to QUEUED).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Self
from urllib.parse import urlsplit
from uuid import UUID

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from iiot.adapters.amqp_session import (  # devices may read the command exchange, never write
    COMMAND_EXCHANGE,
    COMMAND_PREFIX,
    EXCHANGE,
    TOKEN_HEADER,
)
from iiot.bus import LiveEvent, RecordEvent, record_topics
from iiot.errors import IIoTError
from iiot.links import DeliveryFailed, OutboundCommand
from iiot.services import Services
from iiot.storage._common import now_ms
from iiot.supervisor import cancel_and_wait, supervise

__all__ = ["REPLY_BINDING", "REPLY_QUEUE", "AmqpCommandChannel", "AmqpLink"]

log = logging.getLogger(__name__)

REPLY_PREFIX = "replies."
REPLY_QUEUE = "replies"
REPLY_BINDING = "replies.*"
_TIMEOUT_S = 10.0
# After a command came back unroutable, queued commands do not probe the device's queue
# again for this long (its "I listen" message does at once).
_REPROBE_S = 30.0
_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
)


class AmqpLink:
    """A device's bound command queue, as far as the platform knows."""

    protocol = "amqp"
    listens_commands = True
    listens_attributes = False

    def __init__(self, device_id: UUID, channel: AmqpCommandChannel) -> None:
        """A link of one device through the channel's connection."""
        self.device_id = device_id
        self._channel = channel

    async def deliver_command(self, command: OutboundCommand) -> bool:
        """Publish mandatory with confirms: True once the broker put it in a bound queue."""
        try:
            await self._channel.publish_command(self.device_id, command)
        except DeliveryFailed:
            self._channel.drop_link(self.device_id, self)
            raise
        return True

    async def deliver_attributes(self, shared: Mapping[str, Any], deleted: Sequence[str]) -> None:
        """Attributes are not offered over AMQP."""
        raise DeliveryFailed("shared attributes are not delivered over AMQP")


class AmqpCommandChannel:
    """Publishes commands and consumes replies on its own connection."""

    name = "amqp-commands"

    def __init__(self, services: Services) -> None:
        """Nothing connects before `__aenter__`."""
        self._services = services
        self._url = services.settings.amqp_url or ""
        self._exchange: AbstractExchange | None = None
        self._task: asyncio.Task[None] | None = None
        self._events: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[LiveEvent] | None = None
        self._links: dict[UUID, AmqpLink] = {}
        self._probing: set[UUID] = set()
        self._unroutable: dict[UUID, float] = {}  # device -> when its queue was missing
        self._connected = asyncio.Event()  # set on each (re)connection: probe at once
        self._prober: asyncio.Task[None] | None = None

    def describe(self) -> str:
        """One line for the start-up log."""
        parts = urlsplit(self._url)
        return f"AMQP commands via {parts.hostname}:{parts.port or 5672}{parts.path or '/'}"

    async def __aenter__(self) -> Self:
        self._queue = self._services.bus.subscribe(wants=record_topics("command"))
        self._events = asyncio.create_task(self._watch_queued(), name="amqp-commands-events")
        self._prober = asyncio.create_task(self._probe_queued(), name="amqp-commands-probe")
        self._task = asyncio.create_task(
            supervise("AMQP commands", self._serve, log), name="amqp-commands"
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._queue is not None:
            self._services.bus.unsubscribe(self._queue)
        await cancel_and_wait(self._events)
        await cancel_and_wait(self._prober)
        await cancel_and_wait(self._task)
        for device_id, link in list(self._links.items()):
            self.drop_link(device_id, link)

    async def _serve(self, connected: Callable[[], None]) -> None:
        connection = await aio_pika.connect(self._url, timeout=_TIMEOUT_S)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange = await channel.declare_exchange(
                EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
            )
            commands = await channel.declare_exchange(
                COMMAND_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
            )
            replies = await channel.declare_queue(REPLY_QUEUE, durable=True)
            await replies.bind(exchange, REPLY_BINDING)
            await replies.consume(self._on_reply)
            self._exchange = commands
            self._connected.set()
            connected()
            closed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

            def on_close(*_: Any) -> None:
                if not closed.done():
                    closed.set_result(None)

            connection.close_callbacks.add(on_close)
            await closed
        finally:
            self._exchange = None
            for device_id, link in list(self._links.items()):
                self.drop_link(device_id, link)
            with contextlib.suppress(*_ERRORS):
                await connection.close()

    # --- links -----------------------------------------------------------------------------
    async def _attach(self, device_id: UUID) -> None:
        if device_id in self._links or self._exchange is None:
            return
        device = await self._services.registry.get(device_id)
        link = AmqpLink(device_id, self)
        self._links[device_id] = link
        self._services.links.attach(device, link)

    def drop_link(self, device_id: UUID, link: AmqpLink) -> None:
        """The device has no bound queue (any more)."""
        self._unroutable[device_id] = asyncio.get_running_loop().time()
        if self._links.get(device_id) is link:
            del self._links[device_id]
        self._services.links.detach(device_id, link)

    async def _watch_queued(self) -> None:
        """A command queued for a device without a link here: try its queue once."""
        assert self._queue is not None
        while True:
            event = await self._queue.get()
            if not isinstance(event, RecordEvent) or event.topic != "command":
                continue
            if event.kind == "QUEUED" and event.device_id is not None:
                await self._probe(event.device_id)

    async def _probe(self, device_id: UUID) -> None:
        """Attach a link to try the device's queue, unless it was missing a moment ago."""
        if self._services.links.connected(device_id) or device_id in self._probing:
            return
        missing_since = self._unroutable.get(device_id)
        if missing_since is not None:
            if asyncio.get_running_loop().time() - missing_since < _REPROBE_S:
                return
            del self._unroutable[device_id]
        self._probing.add(device_id)
        try:
            await self._attach(device_id)
        except IIoTError as exc:
            log.debug("no AMQP link for %s: %s", device_id, exc)
        finally:
            self._probing.discard(device_id)

    async def _probe_queued(self) -> None:
        """Now and then (and on connecting): try the queues of devices with QUEUED commands
        (events missed while RabbitMQ was unreachable, queues bound since)."""
        while True:
            if self._exchange is not None:
                try:
                    devices = await self._services.store.control.queued_devices(
                        None, now_ms(), 10_000
                    )
                except IIoTError as exc:
                    log.debug("AMQP commands: cannot list queued commands: %s", exc)
                    devices = []
                for device_id in devices:
                    await self._probe(device_id)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_REPROBE_S):  # not wait_for: see cancel_and_wait
                    await self._connected.wait()
            self._connected.clear()

    # --- publishing ------------------------------------------------------------------------
    async def publish_command(self, device_id: UUID, command: OutboundCommand) -> None:
        """Publish mandatory and wait for the broker's confirm; `DeliveryFailed` otherwise."""
        exchange = self._exchange
        if exchange is None:
            raise DeliveryFailed("RabbitMQ is not connected")
        body = {"id": str(command.id), "method": command.method, "params": command.params}
        message = aio_pika.Message(
            json.dumps(body, separators=(",", ":")).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=str(command.id),
            message_id=str(command.id),
            reply_to=f"{REPLY_PREFIX}{device_id}",
            headers={"device_id": str(device_id), "oneway": command.oneway},
        )
        try:
            await exchange.publish(
                message,
                routing_key=f"{COMMAND_PREFIX}{device_id}",
                mandatory=True,
                timeout=_TIMEOUT_S,
            )
        except aio_pika.exceptions.DeliveryError as exc:
            raise DeliveryFailed(f"no queue is bound to {COMMAND_PREFIX}{device_id}") from exc
        except _ERRORS as exc:
            raise DeliveryFailed(f"AMQP publish failed: {exc!r}") from exc

    # --- replies ---------------------------------------------------------------------------
    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        async with message.process(ignore_processed=True):
            try:
                await self._handle_reply(message)
            except IIoTError as exc:  # refused: logged and dropped, never redelivered
                log.info("AMQP reply on %s refused: %s", message.routing_key, exc)

    async def _handle_reply(self, message: AbstractIncomingMessage) -> None:
        routing_key = message.routing_key or ""
        device_id = routing_key.removeprefix(REPLY_PREFIX)
        token = (message.headers or {}).get(TOKEN_HEADER)
        if isinstance(token, bytes):
            token = token.decode(errors="replace")
        if not isinstance(token, str) or not token:
            raise DeliveryFailed("a reply needs the device's token header")
        device = await self._services.registry.authenticate_id(device_id, token)
        if not message.correlation_id:
            self._unroutable.pop(device.id, None)
            await self._attach(device.id)  # "I listen now"
            return
        try:
            command_id = UUID(message.correlation_id)
            response = json.loads(message.body) if message.body.strip() else None
        except ValueError as exc:
            raise DeliveryFailed(f"bad reply: {exc}") from None
        await self._services.inbox.command_reply(device, command_id, response)
