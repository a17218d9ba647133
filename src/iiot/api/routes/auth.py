"""Login (bcrypt off the event loop, throttled) and the caller's own account."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from iiot.api.deps import ApiState, Auth, Svc, api_state
from iiot.api.schemas import LoginIn, TokenOut, UserOut, error_responses
from iiot.errors import AuthenticationError
from iiot.security import hash_password, verify_password

router = APIRouter(prefix="/api/auth", tags=["auth"])


@router.post(
    "/login",
    response_model=TokenOut,
    summary="Log in",
    responses=error_responses(400, 401, 413, 429, 503),
)
async def login(
    body: LoginIn,
    request: Request,
    services: Svc,
    state: Annotated[ApiState, Depends(api_state)],
) -> TokenOut:
    """Exchange a username and password for an access token (`429` after repeated failures)."""
    address = request.client.host if request.client else "unknown"
    state.throttle.check(body.username, address)
    user = await services.store.find_user(body.username)
    if user is None:
        # Spend the same bcrypt time as for a real user, so timing does not reveal names.
        if state.dummy_password_hash is None:
            state.dummy_password_hash = await asyncio.to_thread(
                hash_password, "not-a-password", services.settings.bcrypt_rounds
            )
        await asyncio.to_thread(verify_password, body.password, state.dummy_password_hash)
        ok = False
    else:
        ok = await asyncio.to_thread(verify_password, body.password, user.password_hash)
    if user is None or not ok:
        state.throttle.failed(body.username, address)
        services.metrics.auth_failures.labels("api").inc()
        raise AuthenticationError("wrong username or password")
    state.throttle.succeeded(body.username, address)
    token = state.signer.issue(user.id, user.role, user.tenant_id, user.token_version)
    return TokenOut(access_token=token, expires_in=state.signer.ttl_s)


@router.get(
    "/me",
    response_model=UserOut,
    summary="The logged-in user",
    responses=error_responses(401, 503),
)
async def me(principal: Auth) -> UserOut:
    """Who the access token belongs to."""
    return UserOut.of(principal.user)
