"""What the MQTT client adapter shares with the platform's own endpoint and the command path:
topic names, the refusal log, the merged device lookup and `IIOT_MQTT_URL`'s parts.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import socket
import time
from urllib.parse import parse_qs, unquote, urlsplit
from uuid import UUID

from iiot.model import Device
from iiot.services import Services

__all__ = [
    "DeviceLookup",
    "RefusalLog",
    "_BrokerUrl",
    "_default_client_id",
    "device_prefix",
    "telemetry_topic",
]


def telemetry_topic(device_id: str) -> str:
    """The topic a device publishes telemetry to."""
    return f"devices/{device_id}/telemetry"


def device_prefix(device_id: str) -> str:
    """Every topic a device may use starts with this."""
    return f"devices/{device_id}/"


class RefusalLog:
    """Logs refusals at most once per interval per kind, with the count of those skipped."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._skipped: collections.Counter[str] = collections.Counter()

    def note(self, kind: str, message: str) -> None:
        """Log this refusal unless one of the same kind was logged recently."""
        now = time.monotonic()
        if now - self._last.get(kind, -self._interval) < self._interval:
            self._skipped[kind] += 1
            return
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        suffix = f" ({skipped} similar refusals not logged)" if skipped else ""
        self._logger.info("MQTT: %s%s", message, suffix)


class DeviceLookup:
    """`registry.get` with concurrent lookups of one device merged into one query.

    A burst of messages from devices not yet cached would otherwise send one query per
    message and starve the batch writer of pool connections.
    """

    def __init__(self, services: Services) -> None:
        self._registry = services.registry
        self._pending: dict[UUID, asyncio.Future[Device]] = {}

    async def get(self, device_id: UUID) -> Device:
        """The device (`NotFound`, `StorageUnavailable` as `registry.get`)."""
        device = self._registry.cached(device_id)
        if device is not None:
            return device
        pending = self._pending.get(device_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Device] = asyncio.get_running_loop().create_future()
        self._pending[device_id] = future
        try:
            device = await self._registry.get(device_id)
        except BaseException as exc:
            if isinstance(exc, Exception):
                future.set_exception(exc)
                future.exception()  # retrieved: waiters re-raise it, nobody else must
            else:
                future.cancel()
            raise
        finally:
            del self._pending[device_id]
        future.set_result(device)
        return device


class _BrokerUrl:
    """The parts of `IIOT_MQTT_URL`."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.tls = parts.scheme == "mqtts"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (8883 if self.tls else 1883)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        self.client_id = query.get("client_id")
        self.ca_file = query.get("ca")

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def _default_client_id(services: Services) -> str:
    """A client id stable across restarts, so the persistent session is resumed."""
    group = services.settings.mqtt_shared_group
    if not group:
        return "iiot-platform"
    # Each member of a shared group needs its own stable session: host + data directory.
    where = f"{socket.gethostname()}:{services.settings.data_dir.resolve()}"
    return f"iiot-{group}-{hashlib.sha256(where.encode()).hexdigest()[:12]}"
