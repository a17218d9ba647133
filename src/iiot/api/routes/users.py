"""Users: sysadmins manage everybody; tenant admins manage their own tenant's users."""

from __future__ import annotations

import asyncio
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query, Response

from iiot.api.deps import Auth, Svc
from iiot.api.schemas import MANAGEMENT_ERRORS, UserCreate, UserOut, UserPage, UserPatch
from iiot.errors import InvalidRequest
from iiot.model import Role
from iiot.security import hash_password

router = APIRouter(prefix="/api/users", tags=["users"], responses=MANAGEMENT_ERRORS)

Limit = Annotated[int, Query(ge=1, le=1000, description="page size")]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000, description="items to skip")]


@router.get("", response_model=UserPage, summary="List users")
async def list_users(
    principal: Auth, services: Svc, limit: Limit = 100, offset: Offset = 0
) -> UserPage:
    """Users by username, within the caller's scope."""
    page = await services.store.list_users(principal.scope, limit, offset)
    return UserPage(items=[UserOut.of(u) for u in page.items], total=page.total)


@router.post("", response_model=UserOut, status_code=201, summary="Create a user")
async def create_user(body: UserCreate, principal: Auth, services: Svc) -> UserOut:
    """Create a user; tenant admins create them in their own tenant, never a sysadmin."""
    principal.check_assignable(body.role)
    if body.role is Role.SYSADMIN:
        if body.tenant_id is not None:
            raise InvalidRequest("a sysadmin belongs to no tenant: leave tenant_id out")
        tenant_id = None
    else:
        tenant_id = principal.tenant_for_create(body.tenant_id)
        # A sysadmin naming a tenant that does not exist gets 404, like any missing object.
        await services.store.get_tenant(principal.scope, tenant_id)
    password_hash = await asyncio.to_thread(
        hash_password, body.password, services.settings.bcrypt_rounds
    )
    user = await services.store.create_user(tenant_id, body.username, password_hash, body.role)
    return UserOut.of(user)


@router.get("/{user_id}", response_model=UserOut, summary="Get a user")
async def get_user(user_id: UUID, principal: Auth, services: Svc) -> UserOut:
    """One user."""
    return UserOut.of(await services.store.get_user(principal.scope, user_id))


@router.patch("/{user_id}", response_model=UserOut, summary="Change a user")
async def update_user(user_id: UUID, body: UserPatch, principal: Auth, services: Svc) -> UserOut:
    """Set a new password and/or role (a role cannot cross between sysadmin and tenant)."""
    user = await services.store.get_user(principal.scope, user_id)
    if body.role is not None and body.role is not user.role:
        principal.check_assignable(body.role)
        if user.id == principal.user.id:
            raise InvalidRequest("you cannot change your own role")
        if (body.role is Role.SYSADMIN) != (user.role is Role.SYSADMIN):
            raise InvalidRequest(
                "a user cannot move between sysadmin and a tenant role; create a new user"
            )
    password_hash = None
    if body.password is not None:
        password_hash = await asyncio.to_thread(
            hash_password, body.password, services.settings.bcrypt_rounds
        )
    updated = await services.store.update_user(
        principal.scope, user_id, password_hash=password_hash, role=body.role
    )
    return UserOut.of(updated)


@router.delete("/{user_id}", status_code=204, summary="Delete a user")
async def delete_user(user_id: UUID, principal: Auth, services: Svc) -> Response:
    """Delete a user (not yourself, so the platform always keeps an administrator)."""
    if user_id == principal.user.id:
        raise InvalidRequest("you cannot delete your own account")
    await services.store.delete_user(principal.scope, user_id)
    return Response(status_code=204)
