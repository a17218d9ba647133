"""CoAP device API for control (ThingsBoard's CoAP paths), beside telemetry in `coap.py`.

- `GET /api/v1/{token}/rpc` with Observe: each command arrives as a confirmable
  notification `{"id", "method", "params"}`; the device's ACK of that notification makes
  the command DELIVERED. Reply with `POST /api/v1/{token}/rpc/{id}` (any JSON).
- `POST /api/v1/{token}/rpc`: client-side RPC (`getTime`, `getSessionLimits`).
- `POST /api/v1/{token}/attributes`: client attributes; `GET` (query `clientKeys=a,b` and
  `sharedKeys=c`) reads them; `GET` with Observe notifies shared-attribute changes.

An observation is a `DeviceLink` while it lasts. aiocoap tells a resource about an RST or
a notification that was never acknowledged (the interest ends) but not about the ACK
itself, so the ACK is seen as the notification's exchange leaving aiocoap's message layer
without the interest ending.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs
from uuid import UUID

import aiocoap
from aiocoap.numbers.codes import Code
from aiocoap.numbers.contentformat import ContentFormat
from aiocoap.numbers.types import CON

from iiot.errors import (
    AuthenticationError,
    DeviceDisabled,
    InvalidPayload,
    NotFound,
    StorageUnavailable,
)
from iiot.links import DeliveryFailed, OutboundCommand
from iiot.model import Device
from iiot.services import Services

__all__ = ["CoapControl", "CoapObservation"]

log = logging.getLogger(__name__)

_ACK_POLL_S = 0.01
_ACK_WAIT_S = 100.0  # beyond CoAP's MAX_TRANSMIT_WAIT (93 s): the exchange has ended by then
_OPEN_CHECK_S = 1.0


def _message(code: Any, body: Any = None, **options: Any) -> aiocoap.Message:
    payload = b"" if body is None else json.dumps(body).encode()
    message = aiocoap.Message(code=code, payload=payload, **options)
    if body is not None:
        message.opt.content_format = ContentFormat.JSON
    return message


def _error(code: Any, text: str) -> aiocoap.Message:
    return aiocoap.Message(code=code, payload=text.encode())


class CoapObservation:
    """One observation of `rpc` or `attributes`: pushes confirmable notifications."""

    protocol = "coap"

    def __init__(self, control: CoapControl, pipe: Any, *, commands: bool) -> None:
        """A link for commands (`rpc`) or shared-attribute updates (`attributes`)."""
        self.listens_commands = commands
        self.listens_attributes = not commands
        self._control = control
        self._pipe = pipe
        self._number = 0
        self.ended = asyncio.Event()
        self._lock = asyncio.Lock()

    def _next(self, body: Any) -> aiocoap.Message:
        self._number += 1
        message = _message(Code.CONTENT, body, observe=self._number)
        message.mtype = CON  # confirmable: the device's ACK is the proof of receipt
        return message

    async def deliver_command(self, command: OutboundCommand) -> bool:
        """Notify the command; True once the device acknowledged the notification."""
        body = {"id": str(command.id), "method": command.method, "params": command.params}
        async with self._lock:  # one outstanding notification at a time (NSTART = 1)
            if self.ended.is_set():
                raise DeliveryFailed("the CoAP observation has ended")
            message = self._next(body)
            self._pipe.add_response(message, is_last=False)
            return await self._control.wait_ack(message, self.ended)

    async def deliver_attributes(self, shared: Mapping[str, Any], deleted: Sequence[str]) -> None:
        """Notify changed (and deleted) shared attributes."""
        update: dict[str, Any] = dict(shared)
        if deleted:
            update["deleted"] = list(deleted)
        async with self._lock:
            if self.ended.is_set():
                raise DeliveryFailed("the CoAP observation has ended")
            self._pipe.add_response(self._next(update), is_last=False)


class CoapControl:
    """Handles the control paths of the CoAP device API."""

    def __init__(self, services: Services, is_open: Callable[[], bool]) -> None:
        """`context` is set by the server once it listens (for ACK tracking)."""
        self._services = services
        self._is_open = is_open
        self.context: Any = None

    async def render_to_pipe(self, pipe: Any) -> bool:
        """Answer a control request; False when the path is not one of ours."""
        request = pipe.request
        path = tuple(request.opt.uri_path)  # below api/v1 (the site strips it)
        if len(path) < 2 or path[1] not in ("rpc", "attributes"):
            return False
        token, kind, rest = path[0], path[1], path[2:]
        try:
            pipe_done = await self._dispatch(pipe, request, token, kind, rest)
        except (AuthenticationError, DeviceDisabled) as exc:
            code = Code.UNAUTHORIZED if isinstance(exc, AuthenticationError) else Code.FORBIDDEN
            pipe.add_response(_error(code, str(exc)), is_last=True)
            return True
        except StorageUnavailable as exc:
            pipe.add_response(_error(Code.SERVICE_UNAVAILABLE, str(exc)), is_last=True)
            return True
        except NotFound as exc:
            pipe.add_response(_error(Code.NOT_FOUND, str(exc)), is_last=True)
            return True
        except (InvalidPayload, ValueError) as exc:
            pipe.add_response(_error(Code.BAD_REQUEST, str(exc)), is_last=True)
            return True
        if pipe_done is not None:
            pipe.add_response(pipe_done, is_last=True)
        return True

    async def _device(self, token: str) -> Device:
        device = await self._services.registry.authenticate(token)
        if device.status != "active":
            raise DeviceDisabled(f"device {device.id} is {device.status}")
        return device

    async def _dispatch(
        self, pipe: Any, request: Any, token: str, kind: str, rest: tuple[str, ...]
    ) -> aiocoap.Message | None:
        inbox = self._services.inbox
        if not self._is_open():
            return _error(Code.SERVICE_UNAVAILABLE, "platform is shutting down")
        if request.code == Code.GET and not rest:
            device = await self._device(token)
            if request.opt.observe == 0:
                await self._observe(pipe, device, commands=kind == "rpc")
                return None
            if kind == "rpc":  # also how an observer says goodbye (Observe: 1)
                return aiocoap.Message(code=Code.CONTENT)
            query = parse_qs("&".join(request.opt.uri_query))
            client = _keys(query.get("clientKeys"))
            shared = _keys(query.get("sharedKeys"))
            return _message(Code.CONTENT, await inbox.request_attributes(device, client, shared))
        if request.code != Code.POST:
            return _error(Code.METHOD_NOT_ALLOWED, f"{kind} accepts GET (observe) and POST")
        device = await self._device(token)
        body = json.loads(request.payload) if request.payload.strip() else None
        if kind == "attributes" and not rest:
            if not isinstance(body, dict):
                raise InvalidPayload("client attributes must be a JSON object")
            await inbox.report_attributes(device, body)
            return aiocoap.Message(code=Code.CHANGED)
        if kind == "rpc" and len(rest) == 1:
            await inbox.command_reply(device, UUID(rest[0]), body)
            return aiocoap.Message(code=Code.CHANGED)
        if kind == "rpc" and not rest:
            if not isinstance(body, dict) or not isinstance(body.get("method"), str):
                raise InvalidPayload('the body must be {"method": "...", "params": ...}')
            try:
                answer = await inbox.client_rpc(device, body["method"], body.get("params"))
            except DeliveryFailed as exc:
                return _message(Code.BAD_REQUEST, {"error": str(exc)})
            return _message(Code.CONTENT, answer)
        return _error(Code.NOT_FOUND, "no such resource")

    async def _observe(self, pipe: Any, device: Device, *, commands: bool) -> None:
        """Hold the observation open as a link until the device or the platform ends it."""
        link = CoapObservation(self, pipe, commands=commands)
        pipe.on_interest_end(link.ended.set)
        first = _message(Code.CONTENT, None, observe=0)
        pipe.add_response(first, is_last=False)
        links = self._services.links
        links.attach(device, link)
        try:
            while not link.ended.is_set() and self._is_open():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_OPEN_CHECK_S):  # not wait_for: cancel_and_wait
                        await link.ended.wait()
        finally:
            links.detach(device.id, link)
            if not link.ended.is_set():
                link.ended.set()
                with contextlib.suppress(Exception):
                    pipe.add_response(
                        _error(Code.SERVICE_UNAVAILABLE, "platform is shutting down"), is_last=True
                    )

    async def wait_ack(self, message: aiocoap.Message, ended: asyncio.Event) -> bool:
        """True once the confirmable `message` was acknowledged; `DeliveryFailed` if the
        device reset it, never answered, or the observation ended."""
        manager = self._message_manager()
        if manager is None:
            raise DeliveryFailed("CoAP acknowledgements cannot be tracked")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _ACK_WAIT_S
        while loop.time() < deadline:
            await asyncio.sleep(_ACK_POLL_S)
            if ended.is_set():
                raise DeliveryFailed("the device did not acknowledge the notification")
            if message.mid is None or message.remote is None:
                continue  # not sent yet
            key = (message.remote, message.mid)
            backlog = manager._backlogs.get(message.remote, ())
            if key in manager._active_exchanges or any(m is message for m, _ in backlog):
                continue
            return True
        raise DeliveryFailed("no acknowledgement of the notification")

    def _message_manager(self) -> Any:
        # aiocoap keeps its exchanges private; the UDP token manager's message manager has them.
        context = self.context
        for interface in getattr(context, "request_interfaces", ()):
            manager = getattr(interface, "token_interface", None)
            if hasattr(manager, "_active_exchanges") and hasattr(manager, "_backlogs"):
                return manager
        return None


def _keys(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    keys = [k.strip() for text in values for k in text.split(",") if k.strip()]
    return keys or None
