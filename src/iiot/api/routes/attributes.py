"""Device attributes: client (reported by the device), shared (sent to it), server (kept
from it). Reading is for every role; changing shared and server ones for admins."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Body, Query, Response

from iiot.api.deps import Auth, Svc
from iiot.api.schemas import MANAGEMENT_ERRORS
from iiot.control.attributes import check_attributes, split_keys
from iiot.errors import InvalidRequest
from iiot.storage.control import ATTRIBUTE_SCOPES

__all__ = ["router"]

router = APIRouter(prefix="/api/devices", tags=["attributes"], responses=MANAGEMENT_ERRORS)

AttributesOut = dict[str, dict[str, dict[str, Any]]]


@router.get(
    "/{device_id}/attributes",
    response_model=AttributesOut,
    summary="Read a device's attributes",
)
async def get_attributes(
    device_id: UUID,
    principal: Auth,
    services: Svc,
    scope: Annotated[str | None, Query(description="client, shared or server")] = None,
    keys: Annotated[str | None, Query(description="comma-separated keys")] = None,
) -> AttributesOut:
    """`{"client": {key: {"value", "ts"}}, "shared": {...}, "server": {...}}`."""
    scopes = ATTRIBUTE_SCOPES if scope is None else (scope,)
    found = await services.attributes.get(principal.scope, device_id, scopes, split_keys(keys))
    return {
        s: {k: {"value": v.value, "ts": v.ts} for k, v in values.items()}
        for s, values in found.items()
    }


@router.put(
    "/{device_id}/attributes/{scope}",
    status_code=204,
    summary="Merge shared or server attributes",
)
async def put_attributes(
    device_id: UUID,
    scope: Literal["shared", "server"],
    values: Annotated[dict[str, Any], Body(examples=[{"interval": 30, "mode": "eco"}])],
    principal: Auth,
    services: Svc,
) -> Response:
    """Set these keys (others stay); shared ones reach the device where it listens."""
    device = await services.store.get_device(principal.scope, device_id)
    await services.attributes.merge(principal.scope, device, scope, check_attributes(values))
    return Response(status_code=204)


@router.delete(
    "/{device_id}/attributes/{scope}",
    status_code=204,
    summary="Delete attributes",
)
async def delete_attributes(
    device_id: UUID,
    scope: Literal["client", "shared", "server"],
    principal: Auth,
    services: Svc,
    keys: Annotated[str, Query(description="comma-separated keys")],
) -> Response:
    """Delete keys from a scope (deleted shared keys are announced to the device)."""
    wanted = split_keys(keys)
    if not wanted:
        raise InvalidRequest("keys must name at least one attribute, e.g. keys=a,b")
    device = await services.store.get_device(principal.scope, device_id)
    await services.attributes.delete(principal.scope, device, scope, wanted)
    return Response(status_code=204)
