"""Handling of AMQP telemetry deliveries: a mixin of `AmqpAdapter`.

A message whose token is in the device cache is queued for commit right where it is
delivered and settled from the commit callback (the fast path); anything else takes a task
of its own. Refused messages are republished to `telemetry.rejected` with the reason, then
acknowledged; a storage outage keeps the message and retries its points.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Coroutine
from typing import Any
from uuid import UUID

import aio_pika
import aiormq
from aiormq.abc import DeliveredMessage

from iiot.adapters.amqp_session import (
    _AMQP_ERRORS,
    _BROKER_TIMEOUT_S,
    MESSAGE_HEADER,
    PROTOCOL,
    REASON_HEADER,
    REJECTED_QUEUE,
    TELEMETRY_PREFIX,
    TOKEN_HEADER,
    BrokerUnavailable,
    _Session,
)
from iiot.errors import AuthenticationError, IIoTError, StorageUnavailable
from iiot.ingest import refusal_reason
from iiot.model import DevicePoints
from iiot.services import Services
from iiot.supervisor import Backoff

__all__ = ["AmqpMessages"]

log = logging.getLogger("iiot.adapters.amqp")  # the adapter's logger, as before the split


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


class AmqpMessages:
    """The delivery handling of `AmqpAdapter` (which sets these attributes up)."""

    _services: Services
    _inflight: set[asyncio.Task[None]]
    _fast: int  # deliveries queued for commit without a task of their own
    _fast_idle: asyncio.Event
    _storage_backoff: Backoff

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
            # A partial, not a closure: fewer objects per message in flight (the collector
            # walks every one of them while thousands await their commit).
            ingestor.commit_nowait(
                item, PROTOCOL, functools.partial(self._committed, session, message, tag, item)
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
