"""AMQP (RabbitMQ) ingestion and command delivery.

Devices (or gateways) publish telemetry to the durable topic exchange `iiot` with routing key
`telemetry.{device_id}` and a `token` header. The platform consumes the durable queue
`telemetry`, many deliveries at once (prefetch window), and acknowledges each message only
after its points are committed. A message whose token is in the device cache is queued
for commit right where it is delivered and settled from the commit callback (no task of
its own); anything else (uncached token, refusals, storage outages) takes a task. Refused
messages are republished (persistent, confirmed) to the queue `telemetry.rejected` with
`x-reject-reason` / `x-reject-message` headers, then acknowledged. Commands go to their own
exchange, `iiot.commands`, with routing key `commands.{device_id}`: devices need write
access to `iiot` for telemetry, so commands on `iiot` could be forged by any device.

Reconnection is explicit: every session (connection, channels, topology, consumer) is built
from scratch under `supervise()`, instead of relying on aio-pika's robust reconnection,
which can come back with the queue left without a consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import urlsplit
from uuid import UUID

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractQueue,
)
from aiormq.abc import DeliveredMessage

from iiot.errors import AuthenticationError, IIoTError, StorageUnavailable
from iiot.ingest import refusal_reason
from iiot.model import DevicePoints
from iiot.services import Services
from iiot.supervisor import Backoff, cancel_and_wait, supervise

__all__ = [
    "BINDING_KEY",
    "COMMAND_EXCHANGE",
    "EXCHANGE",
    "QUEUE",
    "REJECTED_QUEUE",
    "AmqpAdapter",
    "BrokerUnavailable",
]

log = logging.getLogger(__name__)

PROTOCOL = "amqp"
EXCHANGE = "iiot"
# Only the platform writes here (devices may read: bind their own queue to their key).
COMMAND_EXCHANGE = "iiot.commands"
QUEUE = "telemetry"
BINDING_KEY = "telemetry.*"
REJECTED_QUEUE = "telemetry.rejected"
TELEMETRY_PREFIX = "telemetry."
COMMAND_PREFIX = "commands."
TOKEN_HEADER = "token"
REASON_HEADER = "x-reject-reason"
MESSAGE_HEADER = "x-reject-message"

# Everything aio-pika/aiormq raise when the broker, the connection or a channel goes away.
_AMQP_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
)
_BROKER_TIMEOUT_S = 10.0


class BrokerUnavailable(IIoTError):
    """RabbitMQ cannot be reached now (a command could not be published)."""


@dataclass(slots=True, eq=False)
class _Session:
    """One connection with its channels and consumer; replaced as a whole on failure."""

    connection: AbstractConnection
    consume_channel: AbstractChannel
    exchange: AbstractExchange  # `iiot.commands`, on the confirming publish channel
    direct: AbstractExchange  # the default exchange, on the confirming publish channel
    queue: AbstractQueue
    channel: aiormq.abc.AbstractChannel  # the consuming channel, below aio-pika
    settler: _Settler
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    consumer_tag: str | None = None


class _Settler:
    """Acknowledges deliveries in order, many per frame (`basic.ack` with `multiple`).

    One ack frame per message costs the broker and this process more than the whole rest of
    the path; acknowledging the longest finished prefix at once removes that cost. Every
    delivery must be settled exactly once (ack, or nack with requeue), else later acks wait.
    """

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self._channel = channel
        self._order: deque[int] = deque()
        self._outcome: dict[int, bool | None] = {}  # tag -> None (running), True ack, False nack
        self._flushing = False
        self._tasks: set[asyncio.Future[None]] = set()

    def begin(self, tag: int) -> None:
        """Record a delivery (in delivery order)."""
        self._order.append(tag)
        self._outcome[tag] = None

    async def settle(self, tag: int, ack: bool) -> None:
        """Mark a delivery done; send what the finished prefix allows.

        One flush at a time (a multiple-ack must never overtake an earlier nack), but no
        lock: while a flush is sending, later settles only record their outcome and the
        running flush sends them too. (With an asyncio.Lock, thousands of settles queued
        on it and each acquire scanned all waiters: the event loop stalled for seconds.)
        """
        self._outcome[tag] = ack
        if self._flushing:
            return
        self._flushing = True
        try:
            await self._flush()
        finally:
            self._flushing = False

    def settle_soon(self, tag: int, ack: bool) -> None:
        """`settle` without waiting (from a commit callback): a task sends the frames."""
        self._outcome[tag] = ack
        if self._flushing:
            return
        self._flushing = True
        task = asyncio.ensure_future(self._flush_in_background())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_in_background(self) -> None:
        try:
            await self._flush()
        except BrokerUnavailable as exc:
            log.debug("could not settle AMQP deliveries (the broker redelivers them): %s", exc)
        finally:
            self._flushing = False

    async def _flush(self) -> None:
        while self._order and self._outcome[self._order[0]] is not None:
            last_ack: int | None = None
            while self._order and self._outcome[self._order[0]] is not None:
                head = self._order.popleft()
                if self._outcome.pop(head):
                    last_ack = head
                    continue
                if last_ack is not None:
                    await self._send(self._channel.basic_ack(last_ack, multiple=True))
                    last_ack = None
                await self._send(self._channel.basic_nack(head, multiple=False, requeue=True))
            if last_ack is not None:
                await self._send(self._channel.basic_ack(last_ack, multiple=True))

    @staticmethod
    async def _send(frame: Awaitable[None]) -> None:
        try:
            await frame
        except _AMQP_ERRORS as exc:
            raise BrokerUnavailable(f"acknowledgement not sent: {exc!r}") from exc
        except Exception as exc:  # aiormq fails a pending drain with a bare Exception on close
            raise BrokerUnavailable(f"acknowledgement not sent: {exc!r}") from exc


def _safe_url(url: str) -> str:
    """host:port/vhost of a broker URL, without credentials, for logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 5672}{parts.path or '/'}"


def _header_text(value: Any) -> str | None:
    """A header value as text (clients send AMQP long strings as str or bytes)."""
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        return value
    return None


def _redelivered(message: DeliveredMessage) -> bool:
    delivery = message.delivery
    return isinstance(delivery, aiormq.spec.Basic.Deliver) and bool(delivery.redelivered)


def _device_id_of(routing_key: str | None) -> str:
    """The device id in `telemetry.{device_id}`, normalised; '' when there is none."""
    if not routing_key or not routing_key.startswith(TELEMETRY_PREFIX):
        return ""
    raw = routing_key[len(TELEMETRY_PREFIX) :]
    try:
        return str(UUID(raw))
    except ValueError:
        return raw


class AmqpAdapter:
    """Consumes telemetry from RabbitMQ and publishes commands to devices."""

    name = "amqp"

    def __init__(self, services: Services) -> None:
        settings = services.settings
        if not settings.amqp_url:
            raise ValueError("AmqpAdapter needs IIOT_AMQP_URL")
        self._services = services
        self._url = settings.amqp_url
        self._prefetch = settings.amqp_prefetch
        self._session: _Session | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._fast = 0  # deliveries queued for commit without a task of their own
        self._fast_idle = asyncio.Event()
        self._up = asyncio.Event()
        self.sessions = 0  # sessions opened so far (1 + reconnections)
        # Shared by every message that met a storage outage: redeliveries slow down
        # together instead of spinning through the queue at full speed.
        self._storage_backoff = Backoff(initial_s=0.5, max_s=5.0)

    def describe(self) -> str:
        """Start-up log line."""
        return (
            f"AMQP {_safe_url(self._url)} consuming queue {QUEUE!r} "
            f"(exchange {EXCHANGE!r}, prefetch {self._prefetch})"
        )

    @property
    def connected(self) -> bool:
        """Whether a session with a live consumer exists now."""
        return self._session is not None and self._session.consumer_tag is not None

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait until the consumer runs (True) or the time is up (False)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout_s)
        return self._up.is_set()

    # --- lifecycle -----------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._set_state(False, "connecting")
        self._task = asyncio.create_task(
            supervise(f"AMQP {_safe_url(self._url)}", self._serve, log, self._set_state),
            name="amqp-supervisor",
        )
        # A broker that is down must not stop the platform: wait briefly, then go on
        # (readiness says "down" and the supervisor keeps trying).
        await self.wait_connected(5.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        session = self._session
        if session is not None and session.consumer_tag is not None:
            # Stop new deliveries first; what was prefetched but not started is requeued
            # by the broker when the connection closes.
            with contextlib.suppress(*_AMQP_ERRORS):
                await asyncio.wait_for(session.channel.basic_cancel(session.consumer_tag), 5.0)
        if self._fast:
            # Let messages queued for commit be committed and acknowledged.
            self._fast_idle.clear()
            with contextlib.suppress(TimeoutError):
                timeout = self._services.settings.commit_timeout_s + 5.0
                await asyncio.wait_for(self._fast_idle.wait(), timeout)
        if self._inflight:
            # Let messages being ingested commit and be acknowledged.
            timeout = self._services.settings.commit_timeout_s + 5.0
            await asyncio.wait(set(self._inflight), timeout=timeout)
            for task in list(self._inflight):
                task.cancel()
        await cancel_and_wait(self._task)
        self._task = None
        self._services.health.set(self.name, "off", "stopped")
        self._services.metrics.component_up.labels(self.name).set(0)

    def _set_state(self, up: bool, detail: str) -> None:
        metrics = self._services.metrics
        metrics.component_up.labels(self.name).set(1 if up else 0)
        metrics.connections.labels(PROTOCOL).set(1 if up else 0)
        if up:
            self._up.set()
            detail = f"consuming {QUEUE!r} on {_safe_url(self._url)}"
        else:
            self._up.clear()
        self._services.health.set(self.name, "up" if up else "down", detail)

    # --- one session -------------------------------------------------------------------
    async def _serve(self, connected: Any) -> None:
        """Connect, declare the topology, consume until the session breaks."""
        connection = await aio_pika.connect(
            self._url,
            timeout=_BROKER_TIMEOUT_S,
            client_properties={"connection_name": "iiot-platform"},
        )
        try:
            session = await self._open_session(connection)
            self.sessions += 1
            self._session = session
            # aiormq's consumer directly: aio-pika's message wrapper cost a third of the
            # consumer's CPU (bare drain here: 14,000 msg/s through aio-pika, 20,000 without).
            consume = await session.channel.basic_consume(
                QUEUE, lambda message: self._on_delivery(session, message), no_ack=False
            )
            session.consumer_tag = consume.consumer_tag
            connected()
            await session.lost.wait()
            raise BrokerUnavailable("AMQP connection or channel lost")
        finally:
            self._session = None
            with contextlib.suppress(*_AMQP_ERRORS):
                await asyncio.wait_for(connection.close(), 5.0)

    async def _open_session(self, connection: AbstractConnection) -> _Session:
        lost = asyncio.Event()

        def on_lost(*_: Any) -> None:
            lost.set()

        connection.close_callbacks.add(on_lost)
        consume_channel = await connection.channel(publisher_confirms=False)
        # Confirms: a refused message is acknowledged only once the broker has its copy.
        publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        for channel in (consume_channel, publish_channel):
            channel.close_callbacks.add(on_lost)
        # The broker may cancel a consumer (queue deleted, node failover): start over.
        underlay = await consume_channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(on_lost)
        await consume_channel.set_qos(prefetch_count=self._prefetch)
        await publish_channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        exchange = await publish_channel.declare_exchange(
            COMMAND_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        # IIOT_AMQP_QUEUE_TYPE=quorum: queues replicated over a RabbitMQ cluster.
        quorum = self._services.settings.amqp_queue_type == "quorum"
        kind: dict[str, Any] | None = {"x-queue-type": "quorum"} if quorum else None
        await publish_channel.declare_queue(REJECTED_QUEUE, durable=True, arguments=kind)
        queue = await consume_channel.declare_queue(QUEUE, durable=True, arguments=kind)
        await queue.bind(EXCHANGE, BINDING_KEY)
        return _Session(
            connection=connection,
            consume_channel=consume_channel,
            exchange=exchange,
            direct=publish_channel.default_exchange,
            queue=queue,
            channel=underlay,
            settler=_Settler(underlay),
            lost=lost,
        )

    # --- messages ----------------------------------------------------------------------
    async def _on_delivery(self, session: _Session, message: DeliveredMessage) -> None:
        """Called per delivery (in aiormq's task): a known device's message is queued for
        commit right here and settled from the commit callback; anything else is handled
        in a task of its own."""
        tag = message.delivery_tag
        if tag is None:  # only basic.get answers lack a tag; we never send basic.get
            return
        session.settler.begin(tag)
        try:
            fast = self._ingest_now(session, message, tag)
        except Exception as exc:  # a bug: refuse this one message, never leave it unsettled
            log.exception("unexpected error while ingesting an AMQP message")
            self._in_task(self._refuse_and_settle(session, message, tag, exc))
            return
        if not fast:
            self._in_task(self._handle(session, message, tag))

    def _in_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def _ingest_now(self, session: _Session, message: DeliveredMessage, tag: int) -> bool:
        """Fast path: a cached token of the routing key's device; False to take the task."""
        properties = message.header.properties
        token = _header_text((properties.headers or {}).get(TOKEN_HEADER))
        if not token:
            return False
        device = self._services.registry.cached_token(token)
        # The routing key as devices normally write it; any other spelling (upper case, no
        # hyphens) or a mismatch is judged by the slow path.
        if device is None or message.routing_key != f"{TELEMETRY_PREFIX}{device.id}":
            return False
        if _redelivered(message):
            self._services.metrics.redeliveries.labels(PROTOCOL).inc()
        ingestor = self._services.ingestor
        try:
            item = ingestor.decode(device, message.body, PROTOCOL)
            ingestor.commit_nowait(
                item, PROTOCOL, lambda error: self._committed(session, message, tag, item, error)
            )
        except StorageUnavailable:  # shutting down: give it back to the broker
            session.settler.settle_soon(tag, False)
            return True
        except IIoTError as exc:  # counted already; refuse it in a task
            self._in_task(self._refuse_and_settle(session, message, tag, exc))
            return True
        except Exception as exc:  # a bug (counted as received already): refuse this one
            log.exception("unexpected error while ingesting an AMQP message")
            self._services.ingestor.refused(PROTOCOL, exc, counted=True)
            self._in_task(self._refuse_and_settle(session, message, tag, exc))
            return True
        self._fast += 1
        return True

    def _committed(
        self,
        session: _Session,
        message: DeliveredMessage,
        tag: int,
        item: DevicePoints,
        error: BaseException | None,
    ) -> None:
        self._fast -= 1
        if self._fast == 0:
            self._fast_idle.set()
        if error is None:
            session.settler.settle_soon(tag, True)
            self._storage_backoff.reset()
        elif isinstance(error, StorageUnavailable):
            self._services.ingestor.refused(PROTOCOL, error, counted=True)
            self._in_task(self._retry_points(session, message, tag, item))
        else:  # refused for good by the store (an IIoTError) or a bug
            refused = error if isinstance(error, Exception) else Exception(repr(error))
            self._in_task(self._refuse_and_settle(session, message, tag, refused))

    async def _retry_points(
        self, session: _Session, message: DeliveredMessage, tag: int, item: DevicePoints
    ) -> None:
        """Commit a fast-path message's decoded points again after a storage outage."""
        ack = False  # cancelled or the session lost: give it back to the broker
        try:
            await asyncio.sleep(self._storage_backoff.next_delay())
            ack = await self._commit_held(session, message, item)
        finally:
            await self._settle(session, tag, ack)

    async def _commit_held(
        self, session: _Session, message: DeliveredMessage, item: DevicePoints
    ) -> bool:
        """Commit decoded points, retrying while storage is unavailable; True to ack.

        The message is kept (with its prefetch slot) and its points, stamped once, are
        retried here: giving it back to the broker would decode it again, and points
        without `ts` would get a second receipt time, so a copy of the first attempt
        still landing would make two rows.
        """
        while True:
            try:
                await self._services.ingestor.commit(item, PROTOCOL)
            except StorageUnavailable as exc:
                if session.lost.is_set():
                    return False  # the broker redelivers it on the next session
                log.debug("storage unavailable, retrying a held message: %s", exc)
                await asyncio.sleep(self._storage_backoff.next_delay())
                continue
            except IIoTError as exc:
                return await self._refuse(session, message, exc)
            except Exception as exc:  # a bug must not leave the message unsettled forever
                log.exception("unexpected error while ingesting an AMQP message")
                return await self._refuse(session, message, exc)
            self._storage_backoff.reset()
            return True

    async def _refuse_and_settle(
        self, session: _Session, message: DeliveredMessage, tag: int, exc: Exception
    ) -> None:
        ack = False
        try:
            ack = await self._refuse(session, message, exc)
        finally:
            await self._settle(session, tag, ack)

    @staticmethod
    async def _settle(session: _Session, tag: int, ack: bool) -> None:
        try:
            await session.settler.settle(tag, ack)
        except BrokerUnavailable as exc:
            log.debug("could not settle an AMQP delivery (broker redelivers it): %s", exc)

    async def _handle(self, session: _Session, message: DeliveredMessage, tag: int) -> None:
        ack = False  # cancelled or crashed: give it back to the broker
        try:
            ack = await self._process(session, message)
        finally:
            # Whatever happened (even cancellation at shutdown), settle: a delivery left
            # unsettled would hold back every later acknowledgement of the channel.
            await self._settle(session, tag, ack)

    async def _process(self, session: _Session, message: DeliveredMessage) -> bool:
        """Ingest one message; True to acknowledge it, False to give it back to the broker."""
        if _redelivered(message):
            self._services.metrics.redeliveries.labels(PROTOCOL).inc()
        try:
            item = await self._decode(message)
        except StorageUnavailable as exc:
            # The token could not be checked: keep the message (and its prefetch slot) a
            # while, then give it back to the broker.
            log.debug("storage unavailable, requeueing message: %s", exc)
            await asyncio.sleep(self._storage_backoff.next_delay())
            return False
        except IIoTError as exc:
            return await self._refuse(session, message, exc)
        except Exception as exc:  # a bug must not leave the message unsettled forever
            log.exception("unexpected error while ingesting an AMQP message")
            return await self._refuse(session, message, exc)
        return await self._commit_held(session, message, item)

    async def _decode(self, message: DeliveredMessage) -> DevicePoints:
        """Authenticate (token must be the routing key's device's) and decode."""
        ingestor = self._services.ingestor
        token = _header_text((message.header.properties.headers or {}).get(TOKEN_HEADER))
        device_id = _device_id_of(message.routing_key)
        try:
            if not token:
                raise AuthenticationError(f"message has no {TOKEN_HEADER!r} header")
            device = await self._services.registry.authenticate(token)
            if str(device.id) != device_id:
                raise AuthenticationError(
                    f"token does not belong to device {device_id or message.routing_key!r}"
                )
        except AuthenticationError as exc:
            ingestor.refused(PROTOCOL, exc)
            raise
        return ingestor.decode(device, message.body, PROTOCOL)

    async def _refuse(self, session: _Session, message: DeliveredMessage, exc: Exception) -> bool:
        """Republish to `telemetry.rejected` with the reason; True once the broker has it."""
        reason = refusal_reason(exc)
        properties = message.header.properties
        headers = {
            # The token is a credential: never copy it into a queue operators read.
            key: value
            for key, value in (properties.headers or {}).items()
            if key != TOKEN_HEADER
        }
        headers[REASON_HEADER] = reason
        headers[MESSAGE_HEADER] = str(exc)[:1000]
        headers["x-original-routing-key"] = message.routing_key or ""
        headers["x-original-exchange"] = message.exchange or ""
        rejected = aio_pika.Message(
            message.body,
            headers=headers,
            content_type=properties.content_type,
            content_encoding=properties.content_encoding,
            message_id=properties.message_id,
            correlation_id=properties.correlation_id,
            timestamp=properties.timestamp,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await session.direct.publish(
                rejected, routing_key=REJECTED_QUEUE, timeout=_BROKER_TIMEOUT_S
            )
        except _AMQP_ERRORS as publish_error:
            # Given back instead: the broker redelivers it and it is refused again.
            log.warning("could not move a refused message to %s: %r", REJECTED_QUEUE, publish_error)
            return False
        return True
