"""Device HTTP API for control (ThingsBoard-compatible), with the device token in the path.

- `GET /api/v1/{token}/rpc?timeout=20000` long-polls for one command (408 when none came);
  `POST /api/v1/{token}/rpc/{id}` answers it; `POST /api/v1/{token}/rpc` asks the platform
  (client-side RPC).
- `POST /api/v1/{token}/attributes` reports client attributes; `GET` with `clientKeys` and
  `sharedKeys` reads them; `GET .../attributes/updates?timeout=` long-polls shared changes.

An open poll is a `DeviceLink`. A command counts as DELIVERED only once its answer was sent
completely (a background task that runs after the response), never when merely chosen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask

from iiot.api.schemas import error_responses
from iiot.control.attributes import split_keys
from iiot.errors import DeviceDisabled, InvalidPayload, PayloadTooLarge
from iiot.links import DeliveryFailed, OutboundCommand
from iiot.model import Device
from iiot.services import Services

__all__ = ["HttpPollLink", "router"]

router = APIRouter(tags=["device API"])

MAX_BODY = 1024 * 1024
_SENT_WAIT_S = 10.0
_DISCONNECT_CHECK_S = 1.0
PollTimeout = Annotated[int, Query(ge=1, le=600_000, description="milliseconds")]


class HttpPollLink:
    """One open long poll: takes exactly one message, then the poll ends."""

    protocol = "http"

    def __init__(self, *, commands: bool) -> None:
        """A poll for commands (`commands`) or for shared-attribute updates."""
        self.listens_commands = commands
        self.listens_attributes = not commands
        self.answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def deliver_command(self, command: OutboundCommand) -> bool:
        """Answer the poll with the command; True once the answer was sent."""
        self._answer({"id": str(command.id), "method": command.method, "params": command.params})
        try:
            await asyncio.wait_for(asyncio.shield(self.sent), _SENT_WAIT_S)
        except TimeoutError:
            raise DeliveryFailed("the HTTP answer could not be sent") from None
        return True

    async def deliver_attributes(self, shared: Mapping[str, Any], deleted: Sequence[str]) -> None:
        """Answer the poll with the changed shared attributes."""
        update: dict[str, Any] = dict(shared)
        if deleted:
            update["deleted"] = list(deleted)
        self._answer(update)

    def _answer(self, body: Any) -> None:
        if self.answer.done():
            raise DeliveryFailed("this HTTP poll was already answered or ended")
        self.answer.set_result(body)

    def mark_sent(self) -> None:
        """The response went out completely."""
        if not self.sent.done():
            self.sent.set_result(None)


async def _device(services: Services, token: str) -> Device:
    device = await services.registry.authenticate(token)
    if device.status != "active":
        raise DeviceDisabled(f"device {device.id} is {device.status}")
    return device


async def _json(request: Request) -> Any:
    body = await request.body()
    if len(body) > MAX_BODY:
        raise PayloadTooLarge(f"the body is over {MAX_BODY} bytes")
    try:
        return json.loads(body) if body.strip() else None
    except ValueError as exc:
        raise InvalidPayload(f"the body is not JSON: {exc}") from None


async def _poll(request: Request, device: Device, link: HttpPollLink, timeout_ms: int) -> Any:
    """Attach the link until it is answered, the timeout passes or the client leaves."""
    services: Services = request.app.state.services
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_ms / 1000
    services.links.attach(device, link)
    try:
        while not link.answer.done():
            left = deadline - loop.time()
            if left <= 0 or await request.is_disconnected():
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, _DISCONNECT_CHECK_S)):  # not wait_for (3.11)
                    await asyncio.shield(link.answer)
    finally:
        services.links.detach(device.id, link)
        if not link.answer.done():
            link.answer.cancel()  # a late delivery now fails and the command is queued again
    return link.answer.result() if not link.answer.cancelled() else None


@router.get(
    "/api/v1/{token}/rpc",
    summary="Long-poll for a command",
    responses={408: {"description": "no command within the timeout"}, **error_responses(401, 403)},
)
async def poll_command(
    request: Request,
    token: str,
    timeout: PollTimeout = 20_000,  # noqa: ASYNC109 - ThingsBoard's parameter
) -> JSONResponse:
    """One command `{"id", "method", "params"}`, or 408 when none came in time."""
    services: Services = request.app.state.services
    device = await _device(services, token)
    link = HttpPollLink(commands=True)
    answer = await _poll(request, device, link, timeout)
    if answer is None:
        return JSONResponse({"detail": "no command within the timeout"}, status_code=408)
    return JSONResponse(answer, background=BackgroundTask(link.mark_sent))


@router.post(
    "/api/v1/{token}/rpc/{command_id}",
    summary="Answer a command",
    responses=error_responses(400, 401, 403, 404),
)
async def reply_command(request: Request, token: str, command_id: UUID) -> JSONResponse:
    """The device's response (any JSON) to a two-way command."""
    services: Services = request.app.state.services
    device = await _device(services, token)
    await services.inbox.command_reply(device, command_id, await _json(request))
    return JSONResponse({})


@router.post(
    "/api/v1/{token}/rpc",
    summary="Ask the platform (client-side RPC)",
    responses=error_responses(400, 401, 403),
)
async def client_rpc(request: Request, token: str) -> JSONResponse:
    """`{"method": "getTime" | "getSessionLimits", "params": {}}` -> the answer."""
    services: Services = request.app.state.services
    device = await _device(services, token)
    body = await _json(request)
    if not isinstance(body, dict) or not isinstance(body.get("method"), str):
        raise InvalidPayload('the body must be {"method": "...", "params": ...}')
    try:
        answer = await services.inbox.client_rpc(device, body["method"], body.get("params"))
    except DeliveryFailed as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    return JSONResponse(answer)


@router.post(
    "/api/v1/{token}/attributes",
    summary="Report client attributes",
    responses=error_responses(400, 401, 403, 413),
)
async def report_attributes(request: Request, token: str) -> JSONResponse:
    """A JSON object of client attributes, merged into the stored ones."""
    services: Services = request.app.state.services
    device = await _device(services, token)
    body = await _json(request)
    if not isinstance(body, dict):
        raise InvalidPayload('client attributes must be a JSON object, e.g. {"fw": "1.2"}')
    await services.inbox.report_attributes(device, body)
    return JSONResponse({})


@router.get(
    "/api/v1/{token}/attributes",
    summary="Read client and shared attributes",
    responses=error_responses(401, 403),
)
async def request_attributes(
    request: Request,
    token: str,
    clientKeys: str | None = None,
    sharedKeys: str | None = None,
) -> JSONResponse:
    """`{"client": {...}, "shared": {...}}` (every key when none is named)."""
    services: Services = request.app.state.services
    device = await _device(services, token)
    answer = await services.inbox.request_attributes(
        device, split_keys(clientKeys), split_keys(sharedKeys)
    )
    return JSONResponse(answer)


@router.get(
    "/api/v1/{token}/attributes/updates",
    summary="Long-poll for shared-attribute changes",
    responses={408: {"description": "no change within the timeout"}, **error_responses(401, 403)},
)
async def poll_attributes(
    request: Request,
    token: str,
    timeout: PollTimeout = 20_000,  # noqa: ASYNC109 - ThingsBoard's parameter
) -> JSONResponse:
    """The changed shared attributes `{key: value, "deleted": [...]}`, or 408."""
    services: Services = request.app.state.services
    device = await _device(services, token)
    answer = await _poll(request, device, HttpPollLink(commands=False), timeout)
    if answer is None:
        return JSONResponse({"detail": "no change within the timeout"}, status_code=408)
    return JSONResponse(answer)
