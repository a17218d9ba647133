"""Devices: create (token shown once), list, change, delete, rotate the token.

Every change goes through `services.registry`, so token caches and live views (the OPC UA
address space) hear of it at once.
"""

from __future__ import annotations

import time
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query, Response

from iiot.api.deps import Auth, Svc
from iiot.api.schemas import (
    MANAGEMENT_ERRORS,
    CertificateIn,
    CertificateOut,
    DeviceCreate,
    DeviceOut,
    DevicePage,
    DevicePatch,
    DeviceWithToken,
)
from iiot.storage.base import DeviceFilter

router = APIRouter(prefix="/api/devices", tags=["devices"], responses=MANAGEMENT_ERRORS)

Limit = Annotated[int, Query(ge=1, le=1000, description="page size")]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000, description="items to skip")]


@router.get("", response_model=DevicePage, summary="List devices")
async def list_devices(
    principal: Auth,
    services: Svc,
    limit: Limit = 100,
    offset: Offset = 0,
    search: Annotated[
        str | None, Query(max_length=255, description="part of the name, any case")
    ] = None,
    type: Annotated[str | None, Query(max_length=64, description="device type")] = None,
    status: Annotated[str | None, Query(max_length=64, description="device status")] = None,
    active: Annotated[
        bool | None, Query(description="heard from within IIOT_INACTIVITY_TIMEOUT_S")
    ] = None,
    connected: Annotated[bool | None, Query(description="a connection is open now")] = None,
    gateway_id: Annotated[UUID | None, Query(description="children of this gateway")] = None,
) -> DevicePage:
    """Devices by name, within the caller's scope, optionally filtered."""
    timeout_s = services.settings.inactivity_timeout_s
    since = int(time.time() * 1000) - timeout_s * 1000
    filters = DeviceFilter(
        search=search or None,
        type=type,
        status=status,
        connected=connected,
        seen_since=since if active is True else None,
        not_seen_since=since if active is False else None,
        gateway_id=gateway_id,
    )
    page = await services.store.list_devices(principal.scope, limit, offset, filters)
    items = [DeviceOut.of(d, timeout_s) for d in page.items]
    return DevicePage(items=items, total=page.total)


@router.post("", response_model=DeviceWithToken, status_code=201, summary="Create a device")
async def create_device(body: DeviceCreate, principal: Auth, services: Svc) -> DeviceWithToken:
    """Create a device; the answer holds its access token, shown only this once."""
    tenant_id = principal.tenant_for_create(body.tenant_id)
    await services.store.get_tenant(principal.scope, tenant_id)
    device, token = await services.registry.create_device(tenant_id, body.name, type=body.type)
    return DeviceWithToken.with_token(device, token, services.settings.inactivity_timeout_s)


@router.get("/{device_id}", response_model=DeviceOut, summary="Get a device")
async def get_device(device_id: UUID, principal: Auth, services: Svc) -> DeviceOut:
    """One device (never its token)."""
    device = await services.store.get_device(principal.scope, device_id)
    return DeviceOut.of(device, services.settings.inactivity_timeout_s)


@router.patch("/{device_id}", response_model=DeviceOut, summary="Change a device")
async def update_device(
    device_id: UUID, body: DevicePatch, principal: Auth, services: Svc
) -> DeviceOut:
    """Rename a device, change its status (`disabled` refuses its data at once) or type."""
    timeout_s = services.settings.inactivity_timeout_s
    if body.name is None and body.status is None and body.type is None:
        device = await services.store.get_device(principal.scope, device_id)
        return DeviceOut.of(device, timeout_s)
    device = await services.registry.update_device(
        principal.scope, device_id, name=body.name, status=body.status, type=body.type
    )
    services.identity.forget(device_id)
    return DeviceOut.of(device, timeout_s)


@router.post(
    "/{device_id}/certificate",
    response_model=CertificateOut,
    summary="Register a device's X.509 client certificate",
)
async def register_certificate(
    device_id: UUID, body: CertificateIn, principal: Auth, services: Svc
) -> CertificateOut:
    """The device may then log in to MQTT over TLS with this certificate (fingerprint kept)."""
    fingerprint = await services.identity.register_certificate(principal.scope, device_id, body.pem)
    return CertificateOut(device_id=device_id, fingerprint=fingerprint)


@router.delete(
    "/{device_id}/certificate", status_code=204, summary="Remove a device's client certificate"
)
async def remove_certificate(device_id: UUID, principal: Auth, services: Svc) -> Response:
    """The certificate no longer logs the device in."""
    await services.identity.remove_certificate(principal.scope, device_id)
    return Response(status_code=204)


@router.delete("/{device_id}", status_code=204, summary="Delete a device")
async def delete_device(device_id: UUID, principal: Auth, services: Svc) -> Response:
    """Delete a device with its telemetry."""
    await services.registry.delete_device(principal.scope, device_id)
    return Response(status_code=204)


@router.post(
    "/{device_id}/token", response_model=DeviceWithToken, summary="Rotate a device's token"
)
async def rotate_token(device_id: UUID, principal: Auth, services: Svc) -> DeviceWithToken:
    """Give the device a new token (shown only in this answer); the old one stops working."""
    device, token = await services.registry.rotate_token(principal.scope, device_id)
    return DeviceWithToken.with_token(device, token, services.settings.inactivity_timeout_s)
