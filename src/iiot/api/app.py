"""FastAPI application factory: management API, device HTTP API, health and metrics."""

from __future__ import annotations

from fastapi import FastAPI

from iiot import __version__
from iiot.api.routes import health
from iiot.services import Services

__all__ = ["create_api"]


def create_api(services: Services) -> FastAPI:
    """Build the HTTP application around the platform's services."""
    api = FastAPI(
        title="IIoT platform",
        version=__version__,
        description="REST management API, device HTTP API, health and metrics.",
    )
    api.state.services = services
    api.include_router(health.router)
    return api
