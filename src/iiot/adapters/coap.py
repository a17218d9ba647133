"""CoAP server (RFC 7252, UDP): the device API for constrained devices, served with aiocoap.

Resources:
- `POST /api/v1/{token}/telemetry`: JSON (content-format 50 or none) or SenML JSON (110);
  `2.04 Changed` once the points are committed, else a 4.xx/5.03 with a diagnostic payload.
- `GET /api/v1/{token}/device`: the device's own id, name and status as JSON.
- `GET /.well-known/core`: the resources above in CoRE Link Format (RFC 6690).

aiocoap's message layer answers retransmitted confirmable requests (same message id and
sender, within EXCHANGE_LIFETIME) from its cache, so a retransmission never reaches the
handler twice. Block-wise requests (Block1, RFC 7959) are reassembled before the handler
runs; a transfer growing past the size limit is refused early with `4.13` and `Size1`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Self

import aiocoap
from aiocoap import error as coap_error
from aiocoap import resource
from aiocoap.numbers.codes import Code
from aiocoap.numbers.contentformat import ContentFormat
from aiocoap.util.linkformat import Link, LinkFormat

from iiot.adapters.coap_control import CoapControl
from iiot.codec import Limits, parse_telemetry
from iiot.errors import (
    AuthenticationError,
    ConfigError,
    DeviceDisabled,
    InvalidPayload,
    PayloadTooLarge,
    StorageUnavailable,
)
from iiot.ingest import Decoder
from iiot.senml import parse_senml
from iiot.services import Services

__all__ = [
    "CONTENT_FORMAT_JSON",
    "CONTENT_FORMAT_SENML_JSON",
    "RETRY_AFTER_S",
    "CoapServer",
    "well_known_links",
]

log = logging.getLogger(__name__)

CONTENT_FORMAT_JSON = 50
CONTENT_FORMAT_SENML_JSON = 110
RETRY_AFTER_S = 5  # Max-Age of a 5.03: when a device should try again
_DRAIN_TIMEOUT_S = 10.0  # how long a stop waits for requests whose points are being committed

_DECODERS: dict[int | None, Decoder] = {
    None: parse_telemetry,
    CONTENT_FORMAT_JSON: parse_telemetry,
    CONTENT_FORMAT_SENML_JSON: parse_senml,
}


def well_known_links() -> LinkFormat:
    """The `/.well-known/core` document.

    The paths hold the device token, which discovery cannot know, so each resource is listed
    once with its path template `{token}` percent-encoded (`%7Btoken%7D`) to stay a valid
    URI reference (RFC 6690 section 2), described by resource type and content formats.
    """
    return LinkFormat(
        [
            Link(
                "/api/v1/%7Btoken%7D/telemetry",
                rt="iiot.telemetry",
                ct=f"{CONTENT_FORMAT_JSON} {CONTENT_FORMAT_SENML_JSON}",
                title="POST telemetry; replace {token} with the device access token",
            ),
            Link(
                "/api/v1/%7Btoken%7D/device",
                rt="iiot.device",
                ct=str(CONTENT_FORMAT_JSON),
                title="GET the device's id, name and status",
            ),
        ]
    )


def _error(code: Any, diagnostic: str, **options: Any) -> aiocoap.Message:
    """A response with a diagnostic payload (RFC 7252 section 5.5.2: UTF-8 text, no format)."""
    message = aiocoap.Message(code=code, payload=diagnostic.encode("utf-8"))
    for name, value in options.items():
        setattr(message.opt, name, value)
    return message


class _DeviceApi(resource.Resource, resource.PathCapable):  # type: ignore[misc]
    """Everything below `/api/v1/`: `{token}/telemetry` and `{token}/device`."""

    def __init__(
        self, services: Services, is_open: Callable[[], bool], control: CoapControl | None = None
    ) -> None:
        super().__init__()
        self._services = services
        self._is_open = is_open
        self._limits: Limits = services.ingestor.limits
        self._control = control  # commands and attributes (coap_control)

    def get_link_description(self) -> None:
        """Hidden from Site's own listing: `well_known_links` describes it."""
        return None

    def get_resources_as_linkheader(self) -> LinkFormat:
        """Nothing to add to Site's listing (see `well_known_links`)."""
        return LinkFormat([])

    async def render_to_pipe(self, pipe: Any) -> None:
        """Refuse oversize block-wise transfers early, reassemble Block1, then render."""
        if self._control is not None and await self._control.render_to_pipe(pipe):
            return
        request = pipe.request
        too_large = self._refuse_oversize(request)
        if too_large is not None:
            pipe.add_response(too_large, is_last=True)
            return
        try:
            request = self._block1.feed_and_take(request)
        except ValueError:
            # aiocoap raises a bare ValueError for a block that does not follow the last one.
            raise coap_error.RequestEntityIncomplete(
                "block-wise transfer out of order: start again from block 0"
            ) from None
        response = await self._block2.extract_or_insert(request, lambda: self.render(request))
        if request.opt.block1 is not None:
            response.opt.block1 = request.opt.block1
        pipe.add_response(response, is_last=True)

    def _refuse_oversize(self, request: Any) -> aiocoap.Message | None:
        # Only block-wise transfers are checked here: a single datagram goes through the
        # ingestor, which refuses (and counts) it like on every other protocol.
        block1 = request.opt.block1
        if block1 is None:
            return None
        limit = self._limits.max_bytes
        announced = request.opt.size1  # a client may state the total size up front
        received = block1.start + len(request.payload)
        if (announced is not None and announced > limit) or received > limit:
            size = max(announced or 0, received)
            return _error(
                Code.REQUEST_ENTITY_TOO_LARGE,
                f"message is at least {size} bytes; the limit is {limit} bytes",
                size1=limit,
            )
        return None

    async def render(self, request: Any) -> aiocoap.Message:
        """Dispatch `{token}/telemetry` and `{token}/device` by path and method."""
        path = tuple(request.opt.uri_path)
        if len(path) != 2 or path[1] not in ("telemetry", "device"):
            return _error(Code.NOT_FOUND, "no such resource; see /.well-known/core")
        token, name = path
        handlers: dict[str, tuple[Any, Callable[[Any, str], Awaitable[aiocoap.Message]]]] = {
            "telemetry": (Code.POST, self._post_telemetry),
            "device": (Code.GET, self._get_device),
        }
        method, handler = handlers[name]
        if request.code != method:
            return _error(Code.METHOD_NOT_ALLOWED, f"{name} accepts {method} only")
        if not self._is_open():
            return _error(
                Code.SERVICE_UNAVAILABLE, "platform is shutting down", max_age=RETRY_AFTER_S
            )
        return await handler(request, token)

    async def _post_telemetry(self, request: Any, token: str) -> aiocoap.Message:
        content_format = request.opt.content_format
        key = None if content_format is None else int(content_format)
        decoder = _DECODERS.get(key)
        if decoder is None:
            return _error(
                Code.UNSUPPORTED_CONTENT_FORMAT,
                f"content-format {key} is not supported; use {CONTENT_FORMAT_JSON} "
                f"(application/json) or {CONTENT_FORMAT_SENML_JSON} (application/senml+json)",
            )
        try:
            await self._services.ingestor.ingest_token(
                token, request.payload, "coap", decode=decoder
            )
        except PayloadTooLarge as exc:
            return _error(Code.REQUEST_ENTITY_TOO_LARGE, str(exc), size1=self._limits.max_bytes)
        except InvalidPayload as exc:
            return _error(Code.BAD_REQUEST, str(exc))
        except AuthenticationError as exc:
            return _error(Code.UNAUTHORIZED, str(exc))
        except DeviceDisabled as exc:
            return _error(Code.FORBIDDEN, str(exc))
        except StorageUnavailable as exc:
            return _error(Code.SERVICE_UNAVAILABLE, str(exc), max_age=RETRY_AFTER_S)
        return aiocoap.Message(code=Code.CHANGED)

    async def _get_device(self, request: Any, token: str) -> aiocoap.Message:
        accept = request.opt.accept
        if accept is not None and int(accept) != CONTENT_FORMAT_JSON:
            return _error(Code.NOT_ACCEPTABLE, f"device is available as {CONTENT_FORMAT_JSON} only")
        try:
            device = await self._services.registry.authenticate(token)
        except AuthenticationError as exc:
            self._services.metrics.auth_failures.labels("coap").inc()
            return _error(Code.UNAUTHORIZED, str(exc))
        except StorageUnavailable as exc:
            return _error(Code.SERVICE_UNAVAILABLE, str(exc), max_age=RETRY_AFTER_S)
        body = {"id": str(device.id), "name": device.name, "status": device.status}
        return aiocoap.Message(
            code=Code.CONTENT,
            payload=json.dumps(body, ensure_ascii=False).encode("utf-8"),
            content_format=ContentFormat.JSON,
        )


def build_site(
    services: Services,
    is_open: Callable[[], bool] = lambda: True,
    control: CoapControl | None = None,
) -> Any:
    """The resource tree of the CoAP server."""
    site = resource.Site()
    site.add_resource(
        [".well-known", "core"], resource.WKCResource(well_known_links, impl_info=None)
    )
    site.add_resource(["api", "v1"], _DeviceApi(services, is_open, control))
    return site


def _check_port_free(host: str, port: int) -> None:
    """Fail if the UDP port is taken.

    aiocoap binds with SO_REUSEPORT, so a second server on the same port would silently
    share the traffic instead of failing; a plain bind first makes a taken port an error.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.bind((host, port))


class CoapServer:
    """The CoAP device API on `settings.bind_host:settings.coap_port` over UDP."""

    name = "coap"

    def __init__(self, services: Services) -> None:
        self._services = services
        self._host = services.settings.bind_host
        self._port = services.settings.coap_port
        self._context: Any = None
        self._open = False
        self._requests = _InFlight()
        self._control = CoapControl(services, lambda: self._open)

    def describe(self) -> str:
        """Start-up log line."""
        return (
            f"CoAP udp {self._host}:{self._port} "
            "(POST /api/v1/{token}/telemetry, GET /api/v1/{token}/device, /.well-known/core)"
        )

    async def __aenter__(self) -> Self:
        try:
            if not self._services.settings.worker_index:  # workers share the port on purpose
                _check_port_free(self._host, self._port)
            self._context = await aiocoap.Context.create_server_context(
                _TrackingSite(
                    build_site(self._services, lambda: self._open, self._control), self._requests
                ),
                bind=(self._host, self._port),
                transports=["udp6"],  # UDP only: aiocoap's defaults would also open TCP/WS
                loggername="iiot.coap.aiocoap",
            )
        except (OSError, coap_error.ResolutionError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            self._services.health.set(self.name, "down", reason)
            raise ConfigError(
                f"IIOT_COAP_PORT={self._port}: cannot listen on UDP {self._host}:{self._port} "
                f"({reason}); choose a free port, or 0 to turn CoAP off"
            ) from None
        self._control.context = self._context
        self._open = True
        self._services.health.set(self.name, "up", f"udp {self._host}:{self._port}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._open = False  # new requests get 5.03; requests being committed still finish
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._requests.idle.wait(), _DRAIN_TIMEOUT_S)
        if self._context is not None:
            await self._context.shutdown()
            self._context = None
        self._services.health.set(self.name, "off", "stopped")


class _InFlight:
    """How many requests are being handled; `idle` is set when none is."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def __enter__(self) -> None:
        self.count += 1
        self.idle.clear()

    def __exit__(self, *exc: object) -> None:
        self.count -= 1
        if self.count == 0:
            self.idle.set()


class _TrackingSite:
    """The root resource: counts requests in progress so a stop can wait for their answers."""

    def __init__(self, site: Any, requests: _InFlight) -> None:
        self._site = site
        self._requests = requests

    async def render_to_pipe(self, pipe: Any) -> None:
        """Render through the site, counting the request as in flight meanwhile."""
        with self._requests:
            await self._site.render_to_pipe(pipe)

    def __getattr__(self, name: str) -> Any:
        # Everything else aiocoap asks of the root (observation, blockwise hooks) is the site's.
        return getattr(self._site, name)
