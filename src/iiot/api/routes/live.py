"""The live channel (`/api/ws`) and the overview figures the console's first screen shows.

Protocol (JSON text frames, documented in docs/api.md): the client's first message is
`{"type": "auth", "token": "<access token>"}` (the token stays out of URLs and logs); then
`{"type": "subscribe"|"unsubscribe", "topics": [...], "device_id": "<uuid>"|null}`.
The server answers `ready`, `subscribed`, `unsubscribed`, `error`, and sends events as
`{"type": topic, "kind", "device_id", "data"}`. Every frame from the server is a JSON array
of such messages (all that waited since the last flush). The connection closes with code 4401 when
the token is missing, wrong or expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import orjson
from fastapi import APIRouter, FastAPI, Request, WebSocket, WebSocketDisconnect
from pydantic import BaseModel

from iiot.api.deps import Auth, Svc
from iiot.api.livehub import TOPICS, LiveHub, Viewer
from iiot.api.schemas import DeviceOut, error_responses
from iiot.errors import AuthenticationError, NotFound
from iiot.model import Device, Role
from iiot.services import Services

__all__ = ["hub_of", "router"]

router = APIRouter(tags=["live"])

AUTH_TIMEOUT_S = 10
MAX_SUBSCRIPTIONS = 1000
CLOSE_UNAUTHORIZED = 4401
# At most five flushes a second per connection: whatever arrives meanwhile is coalesced,
# so 100 open consoles cost the same whether devices send 10 or 10,000 messages a second.
FLUSH_INTERVAL_S = 0.2
_PAGE = 1000


def _device_json(device: Device) -> dict[str, Any]:
    return DeviceOut.of(device).model_dump(mode="json")


def hub_of(app: FastAPI) -> LiveHub:
    """The app's live hub, made on first use."""
    hub: LiveHub | None = getattr(app.state, "live_hub", None)
    if hub is None:
        services: Services = app.state.services
        hub = LiveHub(services.bus, _device_json)
        app.state.live_hub = hub
    return hub


class DeviceCounts(BaseModel):
    """Devices in the caller's scope."""

    total: int
    active: int
    inactive: int
    connected: int


class IngestFigures(BaseModel):
    """Points committed per second, averaged over the last minute."""

    points_per_s: float
    window_s: int


class OverviewOut(BaseModel):
    """What the console's overview shows besides alarms."""

    devices: DeviceCounts
    ingest: IngestFigures
    inactivity_timeout_s: int


@router.get(
    "/api/overview",
    response_model=OverviewOut,
    summary="Device counts and ingest rate",
    responses=error_responses(401, 503),
)
async def overview(request: Request, principal: Auth, services: Svc) -> OverviewOut:
    """Devices total, active (heard from within the inactivity timeout), connected; ingest rate.

    The rate counts points this API process saw committed (its own and, with split roles,
    the ingest role's through the live bridge) since it started watching, at most a minute.
    """
    hub = hub_of(request.app)
    hub.ensure_started()
    timeout_s = services.settings.inactivity_timeout_s
    now_ms = int(time.time() * 1000)
    total = active = connected = offset = 0
    while True:
        page = await services.store.list_devices(principal.scope, _PAGE, offset)
        for device in page.items:
            active += device.active(now_ms, timeout_s)
            connected += device.connected
        total = page.total
        offset += _PAGE
        if offset >= page.total or not page.items:
            break
    return OverviewOut(
        devices=DeviceCounts(
            total=total, active=active, inactive=total - active, connected=connected
        ),
        ingest=IngestFigures(points_per_s=hub.rate.per_second(principal.scope), window_s=60),
        inactivity_timeout_s=timeout_s,
    )


async def _send(ws: WebSocket, *messages: dict[str, Any]) -> None:
    """One frame: a JSON array of messages (one frame per flush, however many updates)."""
    await ws.send_text(orjson.dumps(messages).decode())


async def _authenticate(ws: WebSocket) -> tuple[Viewer, dict[str, Any], float] | None:
    """Wait for the auth message; None (after closing) when it is missing or wrong."""
    services: Services = ws.app.state.services
    try:
        async with asyncio.timeout(AUTH_TIMEOUT_S):
            raw = await ws.receive_text()
        first = orjson.loads(raw)
        if not isinstance(first, dict) or first.get("type") != "auth":
            raise AuthenticationError('the first message must be {"type": "auth", "token": ...}')
        token = first.get("token")
        if not isinstance(token, str) or not token:
            raise AuthenticationError("the auth message needs a token from POST /api/auth/login")
        claims = ws.app.state.security.signer.verify(token)
        try:
            user = await services.store.get_user(None, claims.user_id)
        except NotFound:
            raise AuthenticationError("the user of this access token no longer exists") from None
    except TimeoutError:
        detail = f"no auth message within {AUTH_TIMEOUT_S} s"
    except orjson.JSONDecodeError:
        detail = "messages must be JSON objects"
    except AuthenticationError as exc:
        detail = str(exc)
    else:
        scope = None if user.role is Role.SYSADMIN else user.tenant_id
        me = {
            "id": str(user.id),
            "username": user.username,
            "role": user.role.value,
            "tenant_id": None if user.tenant_id is None else str(user.tenant_id),
        }
        return Viewer(scope), me, float(claims.expires_at)
    with contextlib.suppress(Exception):
        await _send(ws, {"type": "error", "detail": detail})
        await ws.close(CLOSE_UNAUTHORIZED, detail[:120])
    return None


async def _handle(ws: WebSocket, viewer: Viewer, raw: str) -> dict[str, Any]:
    """Apply one subscribe/unsubscribe message; the answer to send."""
    services: Services = ws.app.state.services
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"type": "error", "detail": "messages must be JSON objects"}
    if not isinstance(message, dict) or message.get("type") not in ("subscribe", "unsubscribe"):
        return {"type": "error", "detail": 'type must be "subscribe" or "unsubscribe"'}
    topics = message.get("topics")
    if (
        not isinstance(topics, list)
        or not topics
        or not all(isinstance(t, str) and t in TOPICS for t in topics)
    ):
        return {"type": "error", "detail": f"topics must be a list of: {', '.join(sorted(TOPICS))}"}
    raw_device = message.get("device_id")
    device_id: UUID | None = None
    if raw_device is not None:
        try:
            device_id = UUID(str(raw_device))
            await services.store.get_device(viewer.scope, device_id)
        except (ValueError, NotFound):
            return {"type": "error", "detail": f"device {raw_device} not found"}
    kind = message["type"]
    for topic in topics:
        devices = viewer.subscriptions.setdefault(topic, set())
        if kind == "subscribe":
            if sum(len(d) for d in viewer.subscriptions.values()) >= MAX_SUBSCRIPTIONS:
                return {"type": "error", "detail": f"at most {MAX_SUBSCRIPTIONS} subscriptions"}
            devices.add(device_id)
        else:
            devices.discard(device_id)
    answer = "subscribed" if kind == "subscribe" else "unsubscribed"
    return {"type": answer, "topics": topics, "device_id": raw_device}


async def _pump(ws: WebSocket, viewer: Viewer, expires_at: float) -> None:
    """Send what is waiting, as fast as the browser takes it; close when the token expires."""
    while True:
        remaining = expires_at - time.time()
        if remaining <= 0:
            await _send(ws, {"type": "error", "detail": "access token expired: log in again"})
            await ws.close(CLOSE_UNAUTHORIZED, "access token expired")
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(remaining, 30)):
                await viewer.wake.wait()
        messages = viewer.take()
        if messages:
            await _send(ws, *messages)
            await asyncio.sleep(FLUSH_INTERVAL_S)


@router.websocket("/api/ws")
async def live(ws: WebSocket) -> None:
    """Live telemetry, device, connectivity, alarm, command and attribute events."""
    await ws.accept()
    authenticated = await _authenticate(ws)
    if authenticated is None:
        return
    viewer, me, expires_at = authenticated
    await _send(ws, {"type": "ready", "user": me, "expires_at": int(expires_at)})
    hub = hub_of(ws.app)
    hub.attach(viewer)
    pump = asyncio.create_task(_pump(ws, viewer, expires_at))
    try:
        while not pump.done():
            receive = asyncio.ensure_future(ws.receive_text())
            await asyncio.wait({receive, pump}, return_when=asyncio.FIRST_COMPLETED)
            if not receive.done():
                receive.cancel()
                break
            answer = await _handle(ws, viewer, receive.result())
            viewer.put(("answer", str(id(answer))), answer)
    except (WebSocketDisconnect, RuntimeError, KeyError):
        pass  # gone, or sent a binary frame: the connection ends
    finally:
        hub.detach(viewer)
        pump.cancel()
        with contextlib.suppress(BaseException):
            await pump


class EndpointsOut(BaseModel):
    """Where devices connect (ports; 0 or null = off); the host is the one the console uses."""

    http_port: int
    mqtt_port: int
    mqtts_port: int | None
    mqtt_external: str | None = None  # host:port of an external broker, never its credentials
    coap_port: int
    amqp: str | None = None  # host:port/vhost of RabbitMQ, never its credentials
    opcua_port: int


def _where(url: str | None, default_port: int, with_vhost: bool = False) -> str | None:
    if not url:
        return None
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or default_port}"
    return where + (parts.path or "/") if with_vhost else where


@router.get(
    "/api/endpoints",
    response_model=EndpointsOut,
    summary="Device endpoints (for the console's how-to-connect forms)",
    responses=error_responses(401, 503),
)
async def endpoints(principal: Auth, services: Svc) -> EndpointsOut:
    """The protocols devices can use and their ports."""
    settings = services.settings
    tls = settings.tls_cert is not None and settings.tls_key is not None
    return EndpointsOut(
        http_port=settings.http_port,
        mqtt_port=0 if settings.mqtt_url else settings.mqtt_port,
        mqtts_port=settings.mqtts_port if tls and not settings.mqtt_url else None,
        mqtt_external=_where(settings.mqtt_url, 1883),
        coap_port=settings.coap_port,
        amqp=_where(settings.amqp_url, 5672, with_vhost=True),
        opcua_port=settings.opcua_port,
    )
