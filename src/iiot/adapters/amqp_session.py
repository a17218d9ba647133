"""The parts of an AMQP ingest session: topology names, broker errors, session record, settler.

`AmqpAdapter` (amqp.py) builds a `_Session` per connection; `_Settler` acknowledges the
session's deliveries in order, many per frame.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractQueue,
)

from iiot.errors import IIoTError

__all__ = [
    "BINDING_KEY",
    "COMMAND_EXCHANGE",
    "COMMAND_PREFIX",
    "EXCHANGE",
    "MESSAGE_HEADER",
    "PROTOCOL",
    "QUEUE",
    "REASON_HEADER",
    "REJECTED_QUEUE",
    "TELEMETRY_PREFIX",
    "TOKEN_HEADER",
    "BrokerUnavailable",
]

log = logging.getLogger("iiot.adapters.amqp")  # the adapter's logger, as before the split

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
