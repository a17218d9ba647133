"""`/healthz`, `/readyz` and `/metrics` for a process that serves no API (`--role ingest`).

Supervisors (systemd, Kubernetes, a load balancer) and Prometheus need these on every
process. An ingest-only process answers them on its `IIOT_HTTP_PORT`, and nothing else:
the management and device HTTP APIs stay with the `api` role.
"""

from __future__ import annotations

from fastapi import FastAPI

from iiot import __version__
from iiot.api.routes import health
from iiot.api.server import HttpServer

__all__ = ["OpsHttpServer"]


class OpsHttpServer(HttpServer):
    """Health and metrics only, on the HTTP port of an ingest-only process."""

    def describe(self) -> str:
        """Start-up log line."""
        return f"HTTP {self._host}:{self.port} (ingest role: /healthz, /readyz, /metrics only)"

    def build_app(self) -> FastAPI:
        """Only the health and metrics routes."""
        app = FastAPI(title="IIoT platform (ingest role)", version=__version__)
        app.state.services = self._services
        app.include_router(health.router)
        return app
