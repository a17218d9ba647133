"""Commands to devices (RPC): send, list, read, cancel.

A lightweight command (not persistent) holds the request until the device answers
(two-way: 200 with its response), confirms receipt (one-way: 200) or the timeout passes
(504 with the command's state). A persistent command answers 202 at once and waits for the
device. Sending is for tenant admins and sysadmins; tenant users read.
"""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from iiot.api.deps import Auth, Svc
from iiot.api.schemas import MANAGEMENT_ERRORS, error_responses
from iiot.control.rules import MAX_RETRIES, MAX_TIMEOUT_MS, CommandRequest
from iiot.errors import InvalidRequest, NotFound
from iiot.storage._common import now_ms
from iiot.storage.control import STATES

__all__ = ["router"]

router = APIRouter(tags=["commands"], responses=MANAGEMENT_ERRORS)


class CommandIn(BaseModel):
    """A command as the operator sends it."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(min_length=1, max_length=255, examples=["setValve"])
    params: Any = Field(default_factory=dict, description="any JSON value")
    oneway: bool = False
    persistent: bool = False
    timeout_ms: int = Field(10_000, ge=100, le=MAX_TIMEOUT_MS)
    expires_at: int | None = Field(None, description="Unix ms; persistent default: a day")
    retries: int = Field(0, ge=0, le=MAX_RETRIES)


class TransitionOut(BaseModel):
    """One state the command went through, with its time (Unix ms)."""

    status: str
    ts: int


class CommandOut(BaseModel):
    """A command, its state, the device's response and its history."""

    id: UUID
    device_id: UUID
    method: str
    params: Any
    oneway: bool
    persistent: bool
    timeout_ms: int
    expires_at: int
    retries: int
    attempts: int
    status: str
    response: Any
    error: str | None
    sent_by: UUID | None
    created_at: int
    updated_at: int
    transitions: list[TransitionOut]


class CommandPage(BaseModel):
    """One page of a device's commands, newest first."""

    items: list[CommandOut]
    total: int


@router.post(
    "/api/devices/{device_id}/commands",
    response_model=CommandOut,
    summary="Send a command to a device",
    responses={
        202: {"model": CommandOut, "description": "persistent: queued"},
        **error_responses(504),
    },
)
async def send_command(
    device_id: UUID, body: CommandIn, principal: Auth, services: Svc
) -> JSONResponse:
    """Lightweight: wait for the answer (200) or the timeout (504); persistent: 202."""
    # The registry's cache (a connected device is in it); storing the command checks again
    # that the device exists in the scope.
    device = await services.registry.get(device_id)
    if principal.scope is not None and device.tenant_id != principal.scope:
        raise NotFound(f"device {device_id} not found")
    request = CommandRequest(
        method=body.method,
        params=body.params,
        oneway=body.oneway,
        persistent=body.persistent,
        timeout_ms=body.timeout_ms,
        expires_at=body.expires_at,
        retries=body.retries,
    )
    command = await services.commands.send(principal.scope, device, request, principal.user.id)
    if command.persistent:
        return JSONResponse(command.rest(), status_code=202)
    # The request holds for every attempt, never past the command's expiry.
    attempts_s = command.timeout_ms * (command.retries + 1) / 1000
    wait_s = max(0.0, min(attempts_s, (command.expires_at - now_ms()) / 1000))
    command = await services.commands.wait(principal.scope, command, wait_s, fresh=True)
    done = command.status == "SUCCESSFUL" or (command.oneway and command.status == "DELIVERED")
    return JSONResponse(command.rest(), status_code=200 if done else 504)


@router.get(
    "/api/devices/{device_id}/commands",
    response_model=CommandPage,
    summary="List a device's commands",
)
async def list_commands(
    device_id: UUID,
    principal: Auth,
    services: Svc,
    status: Annotated[str | None, Query(description="one state, e.g. QUEUED")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> CommandPage:
    """Newest first, optionally in one state."""
    if status is not None and status.upper() not in STATES:
        raise InvalidRequest(f"status must be one of {', '.join(STATES)}")
    page = await services.store.control.list_commands(
        principal.scope, device_id, None if status is None else status.upper(), limit, offset
    )
    return CommandPage(
        items=[CommandOut.model_validate(c.rest()) for c in page.items], total=page.total
    )


@router.get("/api/commands/{command_id}", response_model=CommandOut, summary="Get a command")
async def get_command(command_id: UUID, principal: Auth, services: Svc) -> CommandOut:
    """One command with its state history."""
    command = await services.store.control.get_command(principal.scope, command_id)
    return CommandOut.model_validate(command.rest())


@router.delete("/api/commands/{command_id}", response_model=CommandOut, summary="Cancel a command")
async def cancel_command(command_id: UUID, principal: Auth, services: Svc) -> CommandOut:
    """CANCELED while not yet delivered; 409 once delivered or finished."""
    command = await services.commands.cancel(principal.scope, command_id)
    return CommandOut.model_validate(command.rest())
