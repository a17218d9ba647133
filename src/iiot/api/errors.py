"""The one mapping from the platform's error tree to HTTP answers `{"detail": ...}`.

Validation errors of request parameters and bodies answer `400` (not FastAPI's default
`422`) with a readable one-line detail, matching the device API's `400` for bad payloads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from iiot.errors import (
    AuthenticationError,
    Conflict,
    DeviceDisabled,
    IIoTError,
    InvalidPayload,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    StorageUnavailable,
)
from iiot.redact import redact_path
from iiot.security import TooManyAttempts

__all__ = ["STATUS_OF", "install_error_handlers", "validation_detail"]

log = logging.getLogger(__name__)

STATUS_OF: dict[type[IIoTError], int] = {
    NotFound: 404,
    Conflict: 409,
    InvalidRequest: 400,
    InvalidPayload: 400,
    PayloadTooLarge: 413,
    AuthenticationError: 401,
    PermissionDenied: 403,
    DeviceDisabled: 403,
    TooManyAttempts: 429,
    StorageUnavailable: 503,
}

STORAGE_RETRY_AFTER_S = 5
_MAX_DETAIL = 2000


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _platform_error(request: Request, exc: Exception) -> JSONResponse:
    # The closest class in the exception's MRO decides (DeviceDisabled before PermissionDenied).
    status = next((STATUS_OF[cls] for cls in type(exc).__mro__ if cls in STATUS_OF), 500)
    headers: dict[str, str] = {}
    if isinstance(exc, StorageUnavailable):
        headers["Retry-After"] = str(STORAGE_RETRY_AFTER_S)
    elif isinstance(exc, TooManyAttempts):
        headers["Retry-After"] = str(exc.retry_after)
    elif (
        isinstance(exc, AuthenticationError)
        and request.url.path.startswith("/api/")
        and (not request.url.path.startswith("/api/v1/"))
    ):
        headers["WWW-Authenticate"] = "Bearer"
    if status == 500:
        log.error(
            "unmapped platform error on %s %s: %r",
            request.method,
            redact_path(request.url.path),
            exc,
        )
        return _error(500, "internal error")
    return _error(status, str(exc) or type(exc).__name__, headers)


def _location(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in {"body", "query", "path", "header"}:
        where = parts[0]
        rest = ".".join(parts[1:])
        return f"{where} {rest}" if rest else where
    return ".".join(parts)


def validation_detail(errors: Sequence[Any]) -> str:
    """One readable line from pydantic's error list, e.g. `body name: String too long`."""
    messages: list[str] = []
    for error in errors:
        message = str(error.get("msg", "invalid value"))
        ctx = error.get("ctx") or {}
        if error.get("type") == "json_invalid" and ctx.get("error"):
            message = f"invalid JSON: {ctx['error']}"
        if error.get("type") == "missing":
            message = "is required"
        elif error.get("type") == "extra_forbidden":
            message = "is not a field you can set here"
        messages.append(f"{_location(error.get('loc', ()))}: {message}")
    text = "; ".join(messages) or "invalid request"
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _error(400, validation_detail(exc.errors()))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Last resort only: every expected failure has a mapping above.
    path = redact_path(request.url.path)
    log.error("internal error on %s %s", request.method, path, exc_info=exc)
    return _error(500, "internal error")


def install_error_handlers(api: FastAPI) -> None:
    """Register every handler on the app."""
    for cls in (*STATUS_OF, IIoTError):
        api.add_exception_handler(cls, _platform_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(Exception, _unexpected)
