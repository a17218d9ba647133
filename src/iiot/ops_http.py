"""`/healthz`, `/readyz` and `/metrics` for a process that serves no API (`--role ingest`).

Supervisors (systemd, Kubernetes, a load balancer) and Prometheus need these on every
process. An ingest-only process answers them on its `IIOT_HTTP_PORT`, and nothing else:
the management and device HTTP APIs stay with the `api` role.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Self

import uvicorn
from fastapi import FastAPI

from iiot import __version__
from iiot.api.routes import health
from iiot.errors import ConfigError
from iiot.services import Services

__all__ = ["OpsHttpServer"]


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without signal handlers of its own: the platform handles SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class OpsHttpServer:
    """Health and metrics only, on the HTTP port of an ingest-only process."""

    name = "http"

    def __init__(self, services: Services) -> None:
        self._services = services
        self._host = services.settings.bind_host
        self._port = services.settings.http_port
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    def describe(self) -> str:
        """Start-up log line."""
        return f"HTTP {self._host}:{self._port} (ingest role: /healthz, /readyz, /metrics only)"

    async def __aenter__(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"IIOT_HTTP_PORT={self._port}: cannot listen on {self._host}:{self._port} "
                f"({exc.strerror}); give the ingest role its own port"
            ) from None
        sock.listen(128)
        sock.setblocking(False)
        self._socket = sock
        app = FastAPI(title="IIoT platform (ingest role)", version=__version__)
        app.state.services = self._services
        app.include_router(health.router)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
        self._server = _EmbeddedUvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="ops-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        self._services.health.set(self.name, "up", f"{self._host}:{self._port} (health only)")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._socket is not None:
            self._socket.close()
        self._services.health.set(self.name, "off", "stopped")
