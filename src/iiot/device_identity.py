"""Who a device is, beyond its token: registered client certificates and gateway children.

- A device may authenticate to the MQTT endpoint over TLS with an X.509 client
  certificate registered on it; only the certificate's SHA-256 fingerprint is stored.
- A gateway (a device of type "gateway", as in ThingsBoard's gateway API) names the devices
  behind it; the first time it names one, the device is created in the gateway's tenant
  and linked to it. A name already taken by a device that is not this gateway's child is
  refused, so a gateway cannot speak for devices it does not feed.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from uuid import UUID

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from iiot.bus import DeviceEvent, LiveBus
from iiot.errors import AuthenticationError, Conflict, InvalidRequest, PermissionDenied
from iiot.model import Device
from iiot.security import hash_token, new_device_token
from iiot.storage.base import Scope, Store

__all__ = ["DeviceIdentity", "certificate_fingerprint"]

# Children remembered per process; a gateway names the same few devices in every message.
# Entries expire like the registry's, so a child deleted or changed elsewhere is seen soon.
_MAX_CHILDREN = 100_000
_CHILD_TTL_S = 5.0
_MAX_CHILD_NAME = 255


def certificate_fingerprint(pem_or_der: str | bytes) -> str:
    """Hex SHA-256 of a certificate's DER form; `InvalidRequest` if it is not a certificate."""
    try:
        if isinstance(pem_or_der, str) or pem_or_der.lstrip().startswith(b"-----BEGIN"):
            data = pem_or_der.encode() if isinstance(pem_or_der, str) else pem_or_der
            certificate = x509.load_pem_x509_certificate(data)
        else:
            certificate = x509.load_der_x509_certificate(pem_or_der)
    except ValueError as exc:
        raise InvalidRequest(f"not an X.509 certificate in PEM form: {exc}") from None
    return hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()


class DeviceIdentity:
    """Certificate logins and gateway children, on top of the registry's cache and events."""

    def __init__(self, store: Store, bus: LiveBus) -> None:
        self._store = store
        self._bus = bus
        self._children: dict[tuple[UUID, str], tuple[float, Device]] = {}
        self._creating: dict[tuple[UUID, str], asyncio.Lock] = {}

    # --- certificates -------------------------------------------------------------------
    async def register_certificate(self, scope: Scope, device_id: UUID, pem: str) -> str:
        """Register a device's client certificate; returns its fingerprint."""
        fingerprint = certificate_fingerprint(pem)
        device = await self._store.set_device_certificate(scope, device_id, fingerprint)
        self._bus.publish(DeviceEvent("updated", device))
        return fingerprint

    async def remove_certificate(self, scope: Scope, device_id: UUID) -> None:
        """Forget a device's client certificate: it can no longer log in with it."""
        device = await self._store.set_device_certificate(scope, device_id, None)
        self._bus.publish(DeviceEvent("updated", device))

    async def authenticate_certificate(self, der: bytes) -> Device:
        """The device a presented client certificate (DER) is registered to."""
        fingerprint = certificate_fingerprint(der)
        device = await self._store.find_device_by_certificate(fingerprint)
        if device is None:
            raise AuthenticationError("this client certificate is not registered to a device")
        return device

    # --- gateway children ---------------------------------------------------------------
    async def child(self, gateway: Device, name: str) -> Device:
        """The gateway's child device of this name, created on first use."""
        if not gateway.is_gateway:
            raise PermissionDenied(f"device {gateway.name!r} is not a gateway")
        if not isinstance(name, str) or not 1 <= len(name) <= _MAX_CHILD_NAME:
            raise InvalidRequest("a child device's name must be a text of 1 to 255 characters")
        key = (gateway.id, name)
        known = self._children.get(key)
        if known is not None and known[0] > time.monotonic():
            return known[1]
        lock = self._creating.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                device = await self._find_or_create(gateway, name)
        finally:
            self._creating.pop(key, None)
        if len(self._children) >= _MAX_CHILDREN:
            self._children.clear()
        self._children[key] = (time.monotonic() + _CHILD_TTL_S, device)
        return device

    def forget(self, device_id: UUID) -> None:
        """Drop cached children of (or equal to) a changed or deleted device."""
        stale = [k for k, (_, d) in self._children.items() if device_id in (k[0], d.id)]
        for key in stale:
            del self._children[key]

    async def _find_or_create(self, gateway: Device, name: str) -> Device:
        for _ in range(2):
            found = await self._store.find_device_by_name(gateway.tenant_id, name)
            if found is not None:
                if found.gateway_id != gateway.id:
                    raise PermissionDenied(
                        f"device {name!r} exists and is not fed by gateway {gateway.name!r}"
                    )
                return found
            try:
                # Children are fed through their gateway; their own token is never shown.
                device = await self._store.create_device(
                    gateway.tenant_id,
                    name,
                    hash_token(new_device_token()),
                    gateway_id=gateway.id,
                )
            except Conflict:
                continue  # another process created it at the same moment: read it
            self._bus.publish(DeviceEvent("created", device))
            return device
        raise Conflict(f"device {name!r} could not be created for gateway {gateway.name!r}")
