"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from iiot.errors import StorageUnavailable
from iiot.services import Services

router = APIRouter(tags=["health"])


class ComponentOut(BaseModel):
    """A component's state and why."""

    state: Literal["up", "down", "off"]
    detail: str


class ReadyOut(BaseModel):
    """Readiness of the database and every protocol."""

    status: Literal["ready", "not ready"]
    components: dict[str, ComponentOut]


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    """Answers as long as the process serves HTTP."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=ReadyOut,
    summary="Each protocol and the database: up, down or off, and why",
    responses={503: {"model": ReadyOut, "description": "A component is down"}},
)
async def readyz(request: Request) -> JSONResponse:
    """Readiness: 200 when every enabled component is up, else 503."""
    services: Services = request.app.state.services
    components: dict[str, Any] = {}
    try:
        await services.store.ping()
        if services.pipeline.storage_ok:
            components["database"] = {
                "state": "up",
                "detail": services.settings.effective_database_url.split("://")[0],
            }
        else:
            components["database"] = {
                "state": "down",
                "detail": f"writes failing: {services.pipeline.last_error}",
            }
    except StorageUnavailable as exc:
        components["database"] = {"state": "down", "detail": str(exc)}
    for name, health in sorted(services.health.components.items()):
        components[name] = {"state": health.state, "detail": health.detail}
    if services.health.starting:
        components["platform"] = {
            "state": "down",
            "detail": "starting: not every component is up yet",
        }
    ready = all(c["state"] != "down" for c in components.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "components": components},
        status_code=200 if ready else 503,
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    """Every platform metric in the Prometheus text format."""
    services: Services = request.app.state.services
    services.metrics.queue_points.set(services.pipeline.queued_points)
    return Response(services.metrics.render(), media_type="text/plain; version=0.0.4")
