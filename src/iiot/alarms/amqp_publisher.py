"""`AlarmAmqpPublisher`: alarm changes to RabbitMQ, exchange `iiot`, key `alarms.{device_id}`.

Changes made in this process are queued in memory and published in order by one task;
while RabbitMQ is away they wait (up to a bound) and go out once the connection is back.
The webhook outbox, not this publisher, is the durable notification channel.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Self

import aio_pika

from iiot.bus import RecordEvent
from iiot.services import Services
from iiot.supervisor import cancel_and_wait

__all__ = ["AlarmAmqpPublisher"]

log = logging.getLogger(__name__)

EXCHANGE = "iiot"
_QUEUE_MAX = 10_000


class AlarmAmqpPublisher:
    """Publishes every local alarm change as a persistent JSON message."""

    name = "amqp-alarms"

    def __init__(self, services: Services) -> None:
        """Nothing connects before `__aenter__`."""
        if services.alarms is None or not services.settings.amqp_url:
            raise RuntimeError("the AMQP alarm publisher needs services.alarms and an AMQP URL")
        self._services = services
        self._alarms = services.alarms
        self._url = services.settings.amqp_url
        self._queue: asyncio.Queue[RecordEvent] = asyncio.Queue(_QUEUE_MAX)
        self._task: asyncio.Task[None] | None = None
        self._retry: RecordEvent | None = None

    async def __aenter__(self) -> Self:
        """Start following alarm changes (connecting in the background)."""
        self._alarms.listen(self._on_alarm)
        self._task = asyncio.create_task(self._run(), name="amqp-alarm-publisher")
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop publishing."""
        self._alarms.unlisten(self._on_alarm)
        await cancel_and_wait(self._task)

    def describe(self) -> str:
        """One line for the start-up log."""
        return f"AMQP alarm events (exchange {EXCHANGE!r}, routing key alarms.<device id>)"

    def _on_alarm(self, event: RecordEvent) -> None:
        if self._queue.full():
            log.warning("AMQP alarm queue full: event of device %s dropped", event.device_id)
            return
        self._queue.put_nowait(event)

    async def _run(self) -> None:
        while True:
            try:
                connection: Any = await aio_pika.connect_robust(str(self._url))
                async with connection:
                    channel = await connection.channel(publisher_confirms=True)
                    exchange = await channel.declare_exchange(
                        EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
                    )
                    while True:
                        # An event whose publish failed goes first after reconnecting.
                        if self._retry is None:
                            self._retry = await self._queue.get()
                        await self._publish(exchange, self._retry)
                        self._retry = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("AMQP alarm publisher: %s; reconnecting", exc)
                await asyncio.sleep(2)

    @staticmethod
    async def _publish(exchange: Any, event: RecordEvent) -> None:
        body = {"event": f"alarm.{event.kind}", "data": dict(event.data)}
        message = aio_pika.Message(
            json.dumps(body, separators=(",", ":"), default=str).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={"event": f"alarm.{event.kind}"},
        )
        await exchange.publish(message, routing_key=f"alarms.{event.device_id}")
