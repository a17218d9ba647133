"""Webhooks of a tenant: register, list, get, delete, and each one's delivery log."""

from __future__ import annotations

import secrets
from typing import Annotated, Any
from urllib.parse import urlsplit
from uuid import UUID

from fastapi import APIRouter, Body, Query, Response

from iiot.alarms.webhooks import EVENTS, WEBHOOK_TOPIC
from iiot.api.deps import Auth, Svc
from iiot.api.routes.alarms import alarm_service
from iiot.api.schemas import MANAGEMENT_ERRORS
from iiot.bus import RecordEvent
from iiot.errors import InvalidRequest

__all__ = ["router"]

router = APIRouter(prefix="/api/webhooks", tags=["alarms"], responses=MANAGEMENT_ERRORS)

Limit = Annotated[int, Query(ge=1, le=1000, description="page size")]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000, description="items to skip")]
_MAX_URL = 2000
_MAX_SECRET = 255

WebhookBody = Annotated[
    dict[str, Any],
    Body(
        description='{"url", "secret" (optional: generated and shown once), "events", '
        '"tenant_id" (sysadmin only)}',
        examples=[
            {
                "url": "https://ops.example.com/iiot",
                "secret": "a-long-random-secret",
                "events": ["alarm.raised", "alarm.cleared"],
            }
        ],
    ),
]


def _parse(body: dict[str, Any]) -> tuple[str, str | None, tuple[str, ...], UUID | None]:
    unknown = set(body) - {"url", "secret", "events", "tenant_id"}
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    url = body.get("url")
    if not isinstance(url, str) or not 0 < len(url) <= _MAX_URL:
        raise InvalidRequest(f"url must be an http or https URL of at most {_MAX_URL} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise InvalidRequest(f"url is not valid: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"url must be an http or https URL with a host (got {url!r})")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidRequest("url must not contain spaces or control characters")
    secret = body.get("secret")
    if secret is not None and (not isinstance(secret, str) or not 1 <= len(secret) <= _MAX_SECRET):
        raise InvalidRequest(f"secret must be a string of 1 to {_MAX_SECRET} characters")
    events = body.get("events")
    if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
        raise InvalidRequest(f"events must be a non-empty list of: {', '.join(EVENTS)}")
    wrong = [e for e in events if e not in EVENTS]
    if wrong:
        raise InvalidRequest(f"unknown event(s) {wrong}; known: {', '.join(EVENTS)}")
    raw_tenant = body.get("tenant_id")
    try:
        tenant = None if raw_tenant is None else UUID(str(raw_tenant))
    except ValueError:
        raise InvalidRequest(f"tenant_id is not a UUID: {raw_tenant!r}") from None
    return url, secret, tuple(dict.fromkeys(events)), tenant


@router.post("", status_code=201, summary="Register a webhook")
async def create_webhook(body: WebhookBody, principal: Auth, services: Svc) -> dict[str, Any]:
    """Events are POSTed as JSON signed `X-IIoT-Signature: sha256=<hex HMAC of the body>`."""
    url, secret, events, requested = _parse(body)
    tenant_id = principal.tenant_for_create(requested)
    await services.store.get_tenant(principal.scope, tenant_id)
    generated = secret is None
    secret = secret or secrets.token_urlsafe(32)
    hook = await alarm_service(services).store.create_webhook(tenant_id, url, secret, events)
    services.bus.publish(
        RecordEvent(WEBHOOK_TOPIC, "created", tenant_id, None, {"id": str(hook.id)})
    )
    answer = hook.to_json()
    if generated:
        answer["secret"] = secret  # shown this once
    return answer


@router.get("", summary="List webhooks")
async def list_webhooks(
    principal: Auth, services: Svc, limit: Limit = 100, offset: Offset = 0
) -> dict[str, Any]:
    """Webhooks within the caller's scope (never their secrets)."""
    page = await alarm_service(services).store.list_webhooks(principal.scope, limit, offset)
    return {"items": [h.to_json() for h in page.items], "total": page.total}


@router.get("/{webhook_id}", summary="Get a webhook")
async def get_webhook(webhook_id: UUID, principal: Auth, services: Svc) -> dict[str, Any]:
    """One webhook (never its secret)."""
    hook = await alarm_service(services).store.get_webhook(principal.scope, webhook_id)
    return hook.to_json()


@router.delete("/{webhook_id}", status_code=204, summary="Delete a webhook")
async def delete_webhook(webhook_id: UUID, principal: Auth, services: Svc) -> Response:
    """Delete a webhook; what it has not delivered yet is dropped."""
    hook = await alarm_service(services).store.get_webhook(principal.scope, webhook_id)
    await alarm_service(services).store.delete_webhook(principal.scope, webhook_id)
    event = RecordEvent(WEBHOOK_TOPIC, "deleted", hook.tenant_id, None, {"id": str(hook.id)})
    services.bus.publish(event)
    return Response(status_code=204)


@router.get("/{webhook_id}/deliveries", summary="A webhook's delivery log")
async def deliveries(
    webhook_id: UUID, principal: Auth, services: Svc, limit: Limit = 100, offset: Offset = 0
) -> dict[str, Any]:
    """Every delivery attempt, newest first: status code, error, outcome."""
    page = await alarm_service(services).store.list_deliveries(
        principal.scope, webhook_id, limit, offset
    )
    return {"items": [d.to_json() for d in page.items], "total": page.total}
