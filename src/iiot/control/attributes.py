"""`AttributeService`: client, shared and server attributes of devices.

Shared changes are published on the live bus as `RecordEvent("attributes", "shared", ...)`;
every platform process (this one included, through its own bus subscription) pushes them
to the links of the device that listen for attribute updates.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Self
from uuid import UUID

from iiot.bus import LiveBus, RecordEvent, record_topics
from iiot.errors import IIoTError, InvalidRequest
from iiot.links import DeliveryFailed, DeviceLinks
from iiot.model import Device
from iiot.storage._common import now_ms
from iiot.storage.base import Scope, Store
from iiot.storage.control import ATTRIBUTE_SCOPES, AttributeValue
from iiot.supervisor import cancel_and_wait

__all__ = ["MAX_KEY_CHARS", "MAX_VALUE_BYTES", "AttributeService", "check_attributes"]

log = logging.getLogger(__name__)

MAX_KEY_CHARS = 255
MAX_VALUE_BYTES = 64 * 1024
MAX_KEYS = 1000


def check_attributes(values: Any, error: type[IIoTError] = InvalidRequest) -> dict[str, Any]:
    """A JSON object of attributes within the limits, or `error` saying what is wrong."""
    if not isinstance(values, dict) or not values:
        raise error('attributes must be a non-empty JSON object, e.g. {"interval": 30}')
    if len(values) > MAX_KEYS:
        raise error(f"at most {MAX_KEYS} attributes at once")
    for key, value in values.items():
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_CHARS:
            raise error(f"attribute keys must be 1 to {MAX_KEY_CHARS} characters")
        size = len(json.dumps(value).encode())
        if size > MAX_VALUE_BYTES:
            raise error(
                f"attribute {key!r} is {size} bytes of JSON; the limit is {MAX_VALUE_BYTES}"
            )
    return values


def split_keys(text: str | None) -> list[str] | None:
    """`a,b` -> ["a", "b"]; None or blank -> None (every key)."""
    if text is None:
        return None
    keys = [k.strip() for k in text.split(",") if k.strip()]
    return keys or None


class AttributeService:
    """Reading, merging, deleting attributes; pushing shared ones to listening devices."""

    def __init__(self, store: Store, bus: LiveBus, links: DeviceLinks) -> None:
        """Nothing runs before `__aenter__`."""
        self._store = store
        self._bus = bus
        self._links = links
        self._queue: asyncio.Queue[Any] | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._queue = self._bus.subscribe(wants=record_topics("attributes"))
        self._task = asyncio.create_task(self._listen(), name="attributes-push")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._queue is not None:
            self._bus.unsubscribe(self._queue)
        await cancel_and_wait(self._task)

    async def get(
        self,
        scope: Scope,
        device_id: UUID,
        scopes: Sequence[str] = ATTRIBUTE_SCOPES,
        keys: Sequence[str] | None = None,
    ) -> dict[str, dict[str, AttributeValue]]:
        """Attributes by scope."""
        for attr_scope in scopes:
            if attr_scope not in ATTRIBUTE_SCOPES:
                raise InvalidRequest(f"scope must be one of {', '.join(ATTRIBUTE_SCOPES)}")
        return await self._store.control.get_attributes(scope, device_id, scopes, keys)

    async def merge(
        self, scope: Scope, device: Device, attr_scope: str, values: Mapping[str, Any]
    ) -> None:
        """Merge values into a scope; shared ones go to the device."""
        if attr_scope not in ATTRIBUTE_SCOPES:
            raise InvalidRequest(f"scope must be one of {', '.join(ATTRIBUTE_SCOPES)}")
        await self._store.control.set_attributes(scope, device.id, attr_scope, values, now_ms())
        self._announce(device, attr_scope, dict(values), [])

    async def delete(
        self, scope: Scope, device: Device, attr_scope: str, keys: Sequence[str]
    ) -> list[str]:
        """Delete keys; deleted shared keys are announced to the device."""
        if attr_scope not in ATTRIBUTE_SCOPES:
            raise InvalidRequest(f"scope must be one of {', '.join(ATTRIBUTE_SCOPES)}")
        deleted = await self._store.control.delete_attributes(scope, device.id, attr_scope, keys)
        if deleted:
            self._announce(device, attr_scope, {}, deleted)
        return deleted

    def _announce(
        self, device: Device, attr_scope: str, values: dict[str, Any], deleted: list[str]
    ) -> None:
        self._bus.publish(
            RecordEvent(
                "attributes",
                attr_scope,
                device.tenant_id,
                device.id,
                {
                    "device_id": str(device.id),
                    "scope": attr_scope,
                    "values": values,
                    "deleted": deleted,
                },
            )
        )

    async def _listen(self) -> None:
        assert self._queue is not None
        while True:
            event = await self._queue.get()
            if not isinstance(event, RecordEvent) or event.topic != "attributes":
                continue
            if event.kind != "shared" or event.device_id is None:
                continue
            for link in self._links.links(event.device_id):
                if not link.listens_attributes:
                    continue
                try:
                    await link.deliver_attributes(
                        event.data.get("values", {}), event.data.get("deleted", [])
                    )
                except DeliveryFailed as exc:
                    log.info("shared attributes not pushed over %s: %s", link.protocol, exc)
                except Exception:
                    log.exception("link %s failed pushing attributes", link.protocol)
