"""Alarm rules: create, list, get, replace, change, delete (tenant_admin and sysadmin).

Rule changes go on the live bus, so every process's alarm engine reloads them at once.
"""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Body, Query, Response

from iiot.alarms.rules import parse_rule
from iiot.api.deps import Auth, Principal, Svc
from iiot.api.routes.alarms import alarm_service
from iiot.api.schemas import MANAGEMENT_ERRORS
from iiot.errors import InvalidRequest, NotFound
from iiot.services import Services

__all__ = ["router"]

router = APIRouter(prefix="/api/rules", tags=["alarms"], responses=MANAGEMENT_ERRORS)

Limit = Annotated[int, Query(ge=1, le=1000, description="page size")]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000, description="items to skip")]

_EXAMPLE = {
    "name": "High temperature",
    "target": {"device_type": "boiler"},
    "key": "temperature",
    "severity": "MAJOR",
    "create": {"op": "gt", "value": 80, "for_s": 10},
    "clear": {"op": "lt", "value": 75, "for_s": 0},
}
RuleBody = Annotated[
    dict[str, Any],
    Body(
        description="a threshold rule, or {kind: inactivity, timeout_s} (see docs/alarms.md)",
        examples=[_EXAMPLE],
    ),
]


async def _checked(
    services: Services, principal: Principal, tenant_id: UUID, body: dict[str, Any]
) -> dict[str, Any]:
    spec = parse_rule(body)
    device_id = spec["target"].get("device_id")
    if device_id is not None:
        try:
            await services.store.get_device(tenant_id, UUID(device_id))
        except NotFound:
            raise InvalidRequest(
                f"target.device_id: device {device_id} not found in the tenant"
            ) from None
    return spec


@router.get("", summary="List alarm rules")
async def list_rules(
    principal: Auth, services: Svc, limit: Limit = 100, offset: Offset = 0
) -> dict[str, Any]:
    """Rules by name, within the caller's scope."""
    page = await alarm_service(services).store.list_rules(principal.scope, limit, offset)
    return {"items": [r.to_json() for r in page.items], "total": page.total}


@router.post("", status_code=201, summary="Create an alarm rule")
async def create_rule(body: RuleBody, principal: Auth, services: Svc) -> dict[str, Any]:
    """Create a rule; 400 says what is wrong with it."""
    body = dict(body)
    raw_tenant = body.pop("tenant_id", None)
    try:
        requested = None if raw_tenant is None else UUID(str(raw_tenant))
    except ValueError:
        raise InvalidRequest(f"tenant_id is not a UUID: {raw_tenant!r}") from None
    tenant_id = principal.tenant_for_create(requested)
    await services.store.get_tenant(principal.scope, tenant_id)
    spec = await _checked(services, principal, tenant_id, body)
    alarms = alarm_service(services)
    rule = await alarms.store.create_rule(tenant_id, spec)
    alarms.announce_rule("created", rule)
    return rule.to_json()


@router.get("/{rule_id}", summary="Get an alarm rule")
async def get_rule(rule_id: UUID, principal: Auth, services: Svc) -> dict[str, Any]:
    """One rule."""
    return (await alarm_service(services).store.get_rule(principal.scope, rule_id)).to_json()


@router.put("/{rule_id}", summary="Replace an alarm rule")
async def replace_rule(
    rule_id: UUID, body: RuleBody, principal: Auth, services: Svc
) -> dict[str, Any]:
    """Replace a rule as a whole; its evaluation starts over."""
    alarms = alarm_service(services)
    current = await alarms.store.get_rule(principal.scope, rule_id)
    spec = await _checked(services, principal, current.tenant_id, body)
    rule = await alarms.store.replace_rule(principal.scope, rule_id, spec)
    alarms.announce_rule("updated", rule)
    return rule.to_json()


@router.patch("/{rule_id}", summary="Change an alarm rule")
async def patch_rule(
    rule_id: UUID, body: RuleBody, principal: Auth, services: Svc
) -> dict[str, Any]:
    """Change some top-level fields (e.g. `{"enabled": false}`); the result is validated whole."""
    alarms = alarm_service(services)
    current = await alarms.store.get_rule(principal.scope, rule_id)
    spec = await _checked(services, principal, current.tenant_id, {**current.spec, **body})
    rule = await alarms.store.replace_rule(principal.scope, rule_id, spec)
    alarms.announce_rule("updated", rule)
    return rule.to_json()


@router.delete("/{rule_id}", status_code=204, summary="Delete an alarm rule")
async def delete_rule(rule_id: UUID, principal: Auth, services: Svc) -> Response:
    """Delete a rule; its open alarms stay until cleared."""
    alarms = alarm_service(services)
    rule = await alarms.store.delete_rule(principal.scope, rule_id)
    alarms.announce_rule("deleted", rule)
    return Response(status_code=204)
