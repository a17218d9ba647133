"""Tenants: created and changed by sysadmins; other users see only their own tenant."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Response

from iiot.api.deps import Auth, Svc, sysadmin_writes
from iiot.api.schemas import MANAGEMENT_ERRORS, TenantCreate, TenantOut, TenantPage, TenantPatch
from iiot.bus import DeviceEvent, TenantEvent
from iiot.model import Device

router = APIRouter(
    prefix="/api/tenants",
    tags=["tenants"],
    dependencies=[Depends(sysadmin_writes)],
    responses=MANAGEMENT_ERRORS,
)

Limit = Annotated[int, Query(ge=1, le=1000, description="page size")]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000, description="items to skip")]


@router.get("", response_model=TenantPage, summary="List tenants")
async def list_tenants(
    principal: Auth, services: Svc, limit: Limit = 100, offset: Offset = 0
) -> TenantPage:
    """Tenants by name (a tenant's users see only their own)."""
    page = await services.store.list_tenants(principal.scope, limit, offset)
    return TenantPage(items=[TenantOut.of(t) for t in page.items], total=page.total)


@router.post("", response_model=TenantOut, status_code=201, summary="Create a tenant")
async def create_tenant(body: TenantCreate, principal: Auth, services: Svc) -> TenantOut:
    """Create a tenant (sysadmin)."""
    tenant = await services.store.create_tenant(body.name)
    if body.retention_days is not None:
        tenant = await services.store.update_tenant(
            principal.scope, tenant.id, retention_days=body.retention_days
        )
    return TenantOut.of(tenant)


@router.get("/{tenant_id}", response_model=TenantOut, summary="Get a tenant")
async def get_tenant(tenant_id: UUID, principal: Auth, services: Svc) -> TenantOut:
    """One tenant."""
    return TenantOut.of(await services.store.get_tenant(principal.scope, tenant_id))


@router.patch("/{tenant_id}", response_model=TenantOut, summary="Change a tenant")
async def update_tenant(
    tenant_id: UUID, body: TenantPatch, principal: Auth, services: Svc
) -> TenantOut:
    """Rename a tenant or change its retention (`retention_days: null` keeps data forever)."""
    sent = body.model_fields_set
    tenant = await services.store.update_tenant(
        principal.scope,
        tenant_id,
        name=body.name,
        retention_days=body.retention_days,
        clear_retention="retention_days" in sent and body.retention_days is None,
    )
    services.bus.publish(TenantEvent("updated", tenant))  # e.g. the OPC UA folder's name
    return TenantOut.of(tenant)


@router.delete("/{tenant_id}", status_code=204, summary="Delete a tenant")
async def delete_tenant(tenant_id: UUID, principal: Auth, services: Svc) -> Response:
    """Delete a tenant with its users, devices and telemetry."""
    store = services.store
    tenant = await store.get_tenant(principal.scope, tenant_id)
    devices: list[Device] = []
    while True:
        page = await store.list_devices(tenant_id, 1000, len(devices))
        devices.extend(page.items)
        if not page.items or len(devices) >= page.total:
            break
    await store.delete_tenant(principal.scope, tenant_id)
    # Caches and live views (OPC UA address space) must drop the tenant's devices at once.
    for device in devices:
        services.registry.forget(device.id)
        services.bus.publish(DeviceEvent("deleted", device))
    services.bus.publish(TenantEvent("deleted", tenant))
    return Response(status_code=204)
