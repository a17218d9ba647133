"""Device HTTP API (ThingsBoard-compatible): `POST /api/v1/{token}/telemetry`.

A hot path: no bcrypt, no pydantic body model, the body read in chunks up to the
configured limit. Everything else (token, disabled devices, decoding, commit) is the
shared `Ingestor`; its errors map to the contract's status codes in `api.errors`.
"""

from __future__ import annotations

from typing import NoReturn

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from iiot.api.schemas import StoredOut, error_responses
from iiot.codec import parse_telemetry
from iiot.errors import PayloadTooLarge
from iiot.ingest import Decoder
from iiot.senml import parse_senml
from iiot.services import Services

__all__ = ["router"]

router = APIRouter(tags=["device API"])

PROTOCOL = "http"
SENML_JSON = "application/senml+json"
_DRAIN_FACTOR = 4

_BODY_SCHEMA = {
    "oneOf": [
        {"type": "object", "additionalProperties": True},
        {"type": "array", "items": {"type": "object", "additionalProperties": True}},
    ],
    "example": {"temperature": 21.5, "running": True},
}


@router.post(
    "/api/v1/{token}/telemetry",
    response_model=StoredOut,
    summary="Send telemetry with a device token",
    responses=error_responses(400, 401, 403, 413, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _BODY_SCHEMA},
                SENML_JSON: {"schema": {"type": "array", "items": {"type": "object"}}},
            },
        }
    },
)
async def post_telemetry(token: str, request: Request) -> JSONResponse:
    """Store a message: `200` once committed, `503` + `Retry-After` when storage is down."""
    services: Services = request.app.state.services
    ingestor = services.ingestor
    body = await _read_body(request, ingestor.limits.max_bytes, services)
    content_type = request.headers.get("content-type", "")
    decode: Decoder = (
        parse_senml
        if content_type.partition(";")[0].strip().lower() == SENML_JSON
        else parse_telemetry
    )
    stored = await ingestor.ingest_token(token, body, PROTOCOL, decode=decode)
    return JSONResponse({"stored": stored})


async def _read_body(request: Request, max_bytes: int, services: Services) -> bytes:
    """The request body, refusing (`413`) more than `max_bytes` without keeping it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > _DRAIN_FACTOR * max_bytes:
        _refuse_too_large(services, f"message is {int(declared)} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            if size > _DRAIN_FACTOR * max_bytes:
                break
            continue  # discard a bounded remainder: the device then reads our 413, not a reset
        chunks.append(chunk)
    if size > max_bytes:
        _refuse_too_large(services, f"message is over {max_bytes} bytes")
    return b"".join(chunks)


def _refuse_too_large(services: Services, what: str) -> NoReturn:
    exc = PayloadTooLarge(f"{what}; the limit is {services.ingestor.limits.max_bytes} bytes")
    services.ingestor.refused(PROTOCOL, exc)
    raise exc
