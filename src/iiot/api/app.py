"""FastAPI application factory: management API, device HTTP API, health and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from iiot import __version__
from iiot.api.console import install_console
from iiot.api.deps import ApiState
from iiot.api.errors import install_error_handlers
from iiot.api.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from iiot.api.routes import alarms as alarm_routes
from iiot.api.routes import (
    attributes,
    auth,
    commands,
    device_control,
    device_http,
    devices,
    health,
    telemetry,
    tenants,
    users,
)
from iiot.api.routes import rules as rule_routes
from iiot.api.routes import webhooks as webhook_routes
from iiot.api.routes.live import router as live_router
from iiot.security import LoginThrottle, TokenSigner, load_jwt_secret
from iiot.services import Services

__all__ = ["MAX_MANAGEMENT_BODY_BYTES", "create_api"]

# Management bodies are small JSON objects; anything bigger is refused before parsing.
MAX_MANAGEMENT_BODY_BYTES = 1024 * 1024

_DESCRIPTION = """\
REST management API (`/api`, bearer tokens from `POST /api/auth/login`), device HTTP API
(`POST /api/v1/{token}/telemetry`), health (`/healthz`, `/readyz`) and metrics (`/metrics`).

Every error answers `{"detail": "..."}`. Invalid parameters or bodies answer `400`.
"""


def create_api(services: Services) -> FastAPI:
    """Build the HTTP application around the platform's services."""
    settings = services.settings
    api = FastAPI(
        title="IIoT platform",
        version=__version__,
        description=_DESCRIPTION,
        # Served by iiot.api.console from local files (no CDN): `/docs` works offline.
        docs_url=None,
        redoc_url=None,
        # The platform's metrics are Prometheus' (/metrics). FastAPI's own OpenTelemetry
        # hooks asked the tracer and meter providers on every request: ~4% of a request's CPU.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    api.state.services = services
    api.state.security = ApiState(
        signer=TokenSigner(load_jwt_secret(settings.data_dir), settings.jwt_ttl_s),
        throttle=LoginThrottle(settings.login_attempts_per_minute),
    )
    install_error_handlers(api)
    for module in (auth, tenants, users, devices, telemetry, device_http, health):
        api.include_router(module.router)
    for module in (
        commands,  # device control (RPC, attributes)
        attributes,
        device_control,
        alarm_routes,
        rule_routes,
        webhook_routes,
    ):
        api.include_router(module.router)
    api.include_router(live_router)
    install_console(api)
    api.add_middleware(BodyLimitMiddleware, max_bytes=MAX_MANAGEMENT_BODY_BYTES)
    # Added last, so it is outermost: it also times the requests the body limit refuses.
    api.add_middleware(RequestMetricsMiddleware, metrics=services.metrics)

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = _with_400_for_validation(
                get_openapi(
                    title=api.title,
                    version=api.version,
                    description=api.description,
                    routes=api.routes,
                )
            )
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
    return api


def _with_400_for_validation(schema: dict[str, Any]) -> dict[str, Any]:
    """Replace FastAPI's documented `422` by the `400` this API answers for bad input."""
    error_ref = {"$ref": "#/components/schemas/ErrorOut"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None and "400" not in responses:
                responses["400"] = {
                    "description": "Invalid request",
                    "content": {"application/json": {"schema": error_ref}},
                }
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema
