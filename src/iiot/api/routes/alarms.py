"""Alarms: list (newest first, filtered), get, acknowledge, clear, open alarms per severity.

Operators (`tenant_user`) may read and acknowledge; clearing by hand is for `tenant_admin`
and `sysadmin`. Another tenant's alarm answers 404 like a missing one.
"""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials

from iiot.alarms.model import AlarmFilter, AlarmStatus, Severity
from iiot.alarms.service import AlarmService
from iiot.api.deps import Auth, Principal, Svc, _bearer, authorize
from iiot.api.routes.telemetry import TimeParam, parse_time
from iiot.api.schemas import MANAGEMENT_ERRORS
from iiot.errors import InvalidRequest, StorageUnavailable
from iiot.services import Services

__all__ = ["alarm_service", "router"]

router = APIRouter(prefix="/api/alarms", tags=["alarms"], responses=MANAGEMENT_ERRORS)

Limit = Annotated[int, Query(ge=1, le=1000, description="page size")]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000, description="items to skip")]

# ThingsBoard's search statuses, besides the four exact ones.
_SEARCH_STATUS = {
    "ANY": tuple(AlarmStatus),
    "ACTIVE": (AlarmStatus.ACTIVE_UNACK, AlarmStatus.ACTIVE_ACK),
    "CLEARED": (AlarmStatus.CLEARED_UNACK, AlarmStatus.CLEARED_ACK),
    "ACK": (AlarmStatus.ACTIVE_ACK, AlarmStatus.CLEARED_ACK),
    "UNACK": (AlarmStatus.ACTIVE_UNACK, AlarmStatus.CLEARED_UNACK),
}


def alarm_service(services: Services) -> AlarmService:
    """The alarm service, or 503 when this process runs without one."""
    if services.alarms is None:
        raise StorageUnavailable("alarms are not available in this process")
    return services.alarms


async def operator(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Any authenticated user of the tenant, `tenant_user` included, even for a POST."""
    method = request.scope["method"]
    request.scope["method"] = "GET"  # authorize() lets a tenant_user through for reads only
    try:
        return await authorize(request, credentials)
    finally:
        request.scope["method"] = method


Operator = Annotated[Principal, Depends(operator)]


def _statuses(raw: str | None) -> tuple[AlarmStatus, ...] | None:
    if raw is None or not raw.strip():
        return None
    found: list[AlarmStatus] = []
    for part in raw.split(","):
        name = part.strip().upper()
        if name in _SEARCH_STATUS:
            found += _SEARCH_STATUS[name]
        elif name in AlarmStatus.__members__:
            found.append(AlarmStatus(name))
        else:
            allowed = ", ".join([*AlarmStatus.__members__, *_SEARCH_STATUS])
            raise InvalidRequest(f"status={part!r} is not one of {allowed}")
    return tuple(dict.fromkeys(found))


def _severities(raw: str | None) -> tuple[Severity, ...] | None:
    if raw is None or not raw.strip():
        return None
    found: list[Severity] = []
    for part in raw.split(","):
        name = part.strip().upper()
        if name not in Severity.__members__:
            raise InvalidRequest(
                f"severity={part!r} is not one of {', '.join(Severity.__members__)}"
            )
        found.append(Severity(name))
    return tuple(dict.fromkeys(found))


@router.get("", summary="List alarms")
async def list_alarms(
    principal: Auth,
    services: Svc,
    device_id: UUID | None = None,
    status: Annotated[
        str | None,
        Query(
            max_length=200,
            description="ACTIVE_UNACK, ACTIVE_ACK, CLEARED_UNACK, CLEARED_ACK"
            " or ANY, ACTIVE, CLEARED, ACK, UNACK; comma-separated",
        ),
    ] = None,
    severity: Annotated[
        str | None, Query(max_length=200, description="severities, comma-separated")
    ] = None,
    type: Annotated[str | None, Query(min_length=1, max_length=255)] = None,
    start: TimeParam = None,
    end: TimeParam = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> dict[str, Any]:
    """Alarms newest first (by start_ts); start/end bound start_ts (Unix ms or ISO 8601)."""
    where = AlarmFilter(
        device_id=device_id,
        statuses=_statuses(status),
        severities=_severities(severity),
        type=type,
        start=None if start is None else parse_time(start, "start"),
        end=None if end is None else parse_time(end, "end"),
    )
    page = await alarm_service(services).list(principal.scope, where, limit, offset)
    return {"items": [a.to_json() for a in page.items], "total": page.total}


@router.get("/summary", summary="Open alarms per severity")
async def summary(principal: Auth, services: Svc, device_id: UUID | None = None) -> dict[str, Any]:
    """Uncleared alarms per severity (every severity listed) and their total."""
    counts = await alarm_service(services).store.alarm_summary(principal.scope, device_id)
    result: dict[str, Any] = {s.value: counts.get(s.value, 0) for s in Severity}
    result["total"] = sum(counts.values())
    return result


@router.get("/{alarm_id}", summary="Get an alarm")
async def get_alarm(alarm_id: UUID, principal: Auth, services: Svc) -> dict[str, Any]:
    """One alarm."""
    return (await alarm_service(services).get(principal.scope, alarm_id)).to_json()


@router.post("/{alarm_id}/ack", summary="Acknowledge an alarm")
async def ack_alarm(alarm_id: UUID, principal: Operator, services: Svc) -> dict[str, Any]:
    """Acknowledge (operators may); acknowledging twice changes nothing."""
    alarm = await alarm_service(services).ack(principal.scope, alarm_id, principal.user.username)
    return alarm.to_json()


@router.post("/{alarm_id}/clear", summary="Clear an alarm")
async def clear_alarm(alarm_id: UUID, principal: Auth, services: Svc) -> dict[str, Any]:
    """Clear by hand (tenant_admin, sysadmin); clearing twice changes nothing."""
    return (await alarm_service(services).clear(principal.scope, alarm_id)).to_json()
