"""AMQP (RabbitMQ) ingestion (commands to devices: `amqp_commands.py`).

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

Here: the adapter's lifecycle, connection, topology and consumer. Deliveries are handled
in `amqp_messages`; the session record, its settler and the names live in `amqp_session`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Self

import aio_pika
from aio_pika.abc import AbstractConnection

from iiot.adapters.amqp_messages import AmqpMessages
from iiot.adapters.amqp_session import (
    _AMQP_ERRORS,
    _BROKER_TIMEOUT_S,
    BINDING_KEY,
    COMMAND_EXCHANGE,
    EXCHANGE,
    PROTOCOL,
    QUEUE,
    REJECTED_QUEUE,
    BrokerUnavailable,
    _safe_url,
    _Session,
    _Settler,
)
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


class AmqpAdapter(AmqpMessages):
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
                async with asyncio.timeout(timeout):  # not wait_for: see cancel_and_wait
                    await self._fast_idle.wait()
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
