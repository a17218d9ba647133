"""Devices: create (token shown once), list, change, delete, rotate the token.

Every change goes through `services.registry`, so token caches and live views (the OPC UA
address space) hear of it at once.
"""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query, Response

from iiot.api.deps import Auth, Svc
from iiot.api.schemas import (
    MANAGEMENT_ERRORS,
    DeviceCreate,
    DeviceOut,
    DevicePage,
    DevicePatch,
    DeviceWithToken,
)

router = APIRouter(prefix="/api/devices", tags=["devices"], responses=MANAGEMENT_ERRORS)

Limit = Annotated[int, Query(ge=1, le=1000, description="page size")]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000, description="items to skip")]


@router.get("", response_model=DevicePage, summary="List devices")
async def list_devices(
    principal: Auth, services: Svc, limit: Limit = 100, offset: Offset = 0
) -> DevicePage:
    """Devices by name, within the caller's scope."""
    page = await services.store.list_devices(principal.scope, limit, offset)
    return DevicePage(items=[DeviceOut.of(d) for d in page.items], total=page.total)


@router.post("", response_model=DeviceWithToken, status_code=201, summary="Create a device")
async def create_device(body: DeviceCreate, principal: Auth, services: Svc) -> DeviceWithToken:
    """Create a device; the answer holds its access token, shown only this once."""
    tenant_id = principal.tenant_for_create(body.tenant_id)
    await services.store.get_tenant(principal.scope, tenant_id)
    device, token = await services.registry.create_device(tenant_id, body.name)
    return DeviceWithToken.with_token(device, token)


@router.get("/{device_id}", response_model=DeviceOut, summary="Get a device")
async def get_device(device_id: UUID, principal: Auth, services: Svc) -> DeviceOut:
    """One device (never its token)."""
    return DeviceOut.of(await services.store.get_device(principal.scope, device_id))


@router.patch("/{device_id}", response_model=DeviceOut, summary="Change a device")
async def update_device(
    device_id: UUID, body: DevicePatch, principal: Auth, services: Svc
) -> DeviceOut:
    """Rename a device or change its status (`disabled` refuses its data at once)."""
    if body.name is None and body.status is None:
        return DeviceOut.of(await services.store.get_device(principal.scope, device_id))
    device = await services.registry.update_device(
        principal.scope, device_id, name=body.name, status=body.status
    )
    return DeviceOut.of(device)


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
    return DeviceWithToken.with_token(device, token)
