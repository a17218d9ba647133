"""The external MQTT broker's own count of dropped messages, as a metric and a warning.

A Mosquitto left at its default queue limit (`max_queued_messages 1000`) silently drops
QoS 1 messages for the platform's session while the platform is behind, and the devices
were told they were delivered. Mosquitto counts them in `$SYS/broker/publish/messages/dropped`
(published every `sys_interval`, 10 s by default, and retained). This component reads that
topic over a connection of its own (clean session, QoS 0), exports the count as
`iiot_mqtt_broker_dropped_messages`, and warns in the log whenever it grows. Brokers that
publish no such topic (or whose ACL hides `$SYS`) leave the gauge unset: nothing is known.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid
from typing import Self

import mqtt5

from iiot.adapters.mqtt_session import MqttError, MqttSession, Publish
from iiot.adapters.mqtt_shared import _BrokerUrl  # the one parser of IIOT_MQTT_URL
from iiot.services import Services
from iiot.supervisor import Backoff, cancel_and_wait

__all__ = ["DROPPED_TOPIC", "BrokerStats"]

log = logging.getLogger(__name__)

DROPPED_TOPIC = "$SYS/broker/publish/messages/dropped"
_KEEPALIVE_S = 60
_WARN_EVERY_S = 60.0  # at most one warning a minute, with the growth since the last one


class BrokerStats:
    """Follows the external broker's dropped-message counter."""

    name = "mqtt-broker-stats"

    def __init__(self, services: Services) -> None:
        settings = services.settings
        if not settings.mqtt_url:
            raise ValueError("BrokerStats needs IIOT_MQTT_URL")
        self._services = services
        self._url = _BrokerUrl(settings.mqtt_url)
        self._tls = ssl.create_default_context(cafile=self._url.ca_file) if self._url.tls else None
        self._task: asyncio.Task[None] | None = None
        self._session: MqttSession | None = None
        self.dropped: int | None = None  # the broker's latest count
        self._warned_at: int | None = None  # the count at the last warning
        self._warned_time = 0.0

    def describe(self) -> str:
        """One line for the start-up log."""
        return f"MQTT broker statistics from {self._url} ({DROPPED_TOPIC})"

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._follow(), name="mqtt-broker-stats")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._session is not None:
            self._session.abort("stopped")
            self._session = None

    async def _follow(self) -> None:
        backoff = Backoff(initial_s=1, max_s=60)
        while True:
            try:
                session = await self._open()
            except (OSError, MqttError) as exc:
                log.debug("MQTT broker statistics: cannot connect: %s", exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self._session = session
            await session.closed
            self._session = None
            await asyncio.sleep(backoff.next_delay())

    async def _open(self) -> MqttSession:
        url = self._url
        connect = mqtt5.ConnectPacket(
            f"iiot-stats-{uuid.uuid4().hex[:12]}",
            username=url.username,
            password=None if url.password is None else url.password.encode(),
            clean_start=True,
            keep_alive=_KEEPALIVE_S,
        )
        session, _ = await MqttSession.connect(
            url.host, url.port, connect, self._received, tls=self._tls
        )
        try:
            granted = await session.subscribe(DROPPED_TOPIC, qos=0)
        except MqttError:
            session.abort("no subscription")
            raise
        if granted.value >= 0x80:
            log.info(
                "MQTT broker %s refuses %s (%s): its dropped messages cannot be watched",
                url,
                DROPPED_TOPIC,
                granted.name,
            )
        return session

    def _received(self, _session: MqttSession, message: Publish) -> None:
        if message.topic != DROPPED_TOPIC:
            return
        try:
            count = int(bytes(message.payload).decode().strip())
        except (UnicodeDecodeError, ValueError):
            return
        self.note(count)

    def note(self, count: int) -> None:
        """Record the broker's count; warn when it grew (at most once a minute)."""
        previous, self.dropped = self.dropped, count
        self._services.metrics.mqtt_broker_dropped.labels(str(self._url)).set(count)
        if previous is None:
            self._warned_at = count  # what was dropped before we started is not news
            if count:
                log.warning(
                    "MQTT broker %s has dropped %d messages since it started (%s)",
                    self._url,
                    count,
                    DROPPED_TOPIC,
                )
            return
        if self._warned_at is not None and count < self._warned_at:
            self._warned_at = count  # the broker restarted: its counter began again
        now = time.monotonic()
        if count > (self._warned_at or 0) and now - self._warned_time >= _WARN_EVERY_S:
            log.warning(
                "MQTT broker %s dropped %d messages (%d in all, %s): its queues are full; "
                "raise Mosquitto's max_queued_messages / max_queued_bytes (docs/scaling.md) "
                "or add ingest workers",
                self._url,
                count - (self._warned_at or 0),
                count,
                DROPPED_TOPIC,
            )
            self._warned_at, self._warned_time = count, now
