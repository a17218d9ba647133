"""Pure-ASGI middleware: request latency for `/metrics`, and the management body limit.

Pure ASGI (not `BaseHTTPMiddleware`) keeps the per-request cost low on the device hot path.
"""

from __future__ import annotations

import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from iiot.metrics import Metrics

__all__ = ["BodyLimitMiddleware", "RequestMetricsMiddleware"]

DEVICE_PREFIX = "/api/v1/"
_DRAIN_FACTOR = 4


class RequestMetricsMiddleware:
    """Observes `iiot_http_request_seconds` labelled by method, route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.histogram = metrics.http_request_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            # The template (`/api/devices/{device_id}`), never the raw path: bounded labels.
            template = getattr(route, "path", None) or "unmatched"
            self.histogram.labels(scope["method"], template, str(status)).observe(
                time.perf_counter() - started
            )


class BodyLimitMiddleware:
    """Refuses request bodies over `max_bytes` with `413 {"detail": ...}` before the app reads them.

    The device telemetry route (`/api/v1/...`) applies its own, configurable message limit
    while streaming (and counts the refusal in its metrics), so it is left alone here.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or str(scope["path"]).startswith(DEVICE_PREFIX):
            await self.app(scope, receive, send)
            return
        declared = next(
            (int(v) for k, v in scope["headers"] if k == b"content-length" and v.isdigit()), 0
        )
        if declared > _DRAIN_FACTOR * self.max_bytes:
            await _too_large(send, self.max_bytes)  # not worth reading: the client gets a reset
            return
        # Read the whole (bounded) body first, so a chunked upload cannot grow unbounded.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay(message, receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = bool(message.get("more_body", False))
            if size > self.max_bytes or declared > self.max_bytes:
                # Discard a bounded remainder first, so a client still sending its body
                # reads our 413 instead of a reset connection.
                while more and size <= _DRAIN_FACTOR * self.max_bytes:
                    message = await receive()
                    size += len(message.get("body", b""))
                    more = message["type"] == "http.request" and bool(message.get("more_body"))
                await _too_large(send, self.max_bytes)
                return
            chunks.append(chunk)
        whole: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay(whole, receive), send)


def _replay(first: Message, then: Receive) -> Receive:
    pending = [first]

    async def receive() -> Message:
        if pending:
            return pending.pop()
        return await then()

    return receive


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps({"detail": f"request body is over the limit of {limit} bytes"}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
