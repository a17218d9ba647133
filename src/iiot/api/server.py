"""The HTTP server component: uvicorn serving the FastAPI app inside the platform's loop."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import socket
from collections.abc import Iterator
from typing import Literal, Self

import uvicorn
from fastapi import FastAPI

from iiot.api.app import create_api
from iiot.errors import ConfigError
from iiot.services import Services

__all__ = ["HttpServer"]

log = logging.getLogger(__name__)

_BAD_REQUEST = json.dumps({"detail": "invalid HTTP request: it could not be parsed"}).encode()


def _http_protocol() -> type[asyncio.Protocol] | Literal["h11"]:
    """uvicorn's httptools protocol (C parser) when installed, else h11 (pure Python).

    A request httptools cannot parse (e.g. a control character in a header value, which
    h11 lets through) gets the API's JSON error shape instead of uvicorn's plain text.
    """
    if importlib.util.find_spec("httptools") is None:
        return "h11"
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class JsonErrorHttpToolsProtocol(HttpToolsProtocol):
        def send_400_response(self, msg: str) -> None:
            head = [b"HTTP/1.1 400 Bad Request\r\n"]
            for name, value in self.server_state.default_headers:
                head.append(b"%s: %s\r\n" % (name, value))
            head.append(
                b"content-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n" % len(_BAD_REQUEST)
            )
            self.transport.write(b"".join(head) + _BAD_REQUEST)
            self.transport.close()

    return JsonErrorHttpToolsProtocol


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without signal handlers of its own: the platform handles SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """REST API, device HTTP API, `/healthz`, `/readyz` and `/metrics` on one port."""

    name = "http"

    def __init__(self, services: Services) -> None:
        self._services = services
        settings = services.settings
        self._host = settings.bind_host
        self._port = settings.http_port
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    def describe(self) -> str:
        """Start-up log line."""
        return f"HTTP {self._host}:{self.port} (REST API /api, docs /docs, metrics /metrics)"

    def build_app(self) -> FastAPI:
        """The application this server serves (the whole API here)."""
        return create_api(self._services)

    @property
    def port(self) -> int:
        """The bound port (useful when configured as an ephemeral one in tests)."""
        if self._socket is not None:
            return int(self._socket.getsockname()[1])
        return self._port

    async def __aenter__(self) -> Self:
        # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose
        # proto says TCP; without it Nagle holds each response body ~40 ms (delayed ACK).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._services.settings.http_reuse_port:  # `iiot run --workers N` shares the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"IIOT_HTTP_PORT={self._port}: cannot listen on {self._host}:{self._port} "
                f"({exc.strerror}); choose a free port"
            ) from None
        sock.listen(2048)
        sock.setblocking(False)
        self._socket = sock
        config = uvicorn.Config(
            self.build_app(),
            log_config=None,
            access_log=False,
            lifespan="off",
            proxy_headers=True,
            forwarded_allow_ips="127.0.0.1",
            timeout_graceful_shutdown=5,
            # The loop is the platform's own (uvloop when installed, see iiot.cli).
            http=_http_protocol(),
            # Live frames are small JSON arrays sent up to 5 times a second per console:
            # compressing each one cost more CPU than the bytes it saved.
            ws_per_message_deflate=False,
        )
        self._server = _EmbeddedUvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http")
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        self._services.health.set(self.name, "up", f"{self._host}:{self.port}")
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
