"""Authorization in one place: who is calling, which tenant scope they see, what they may do.

Every management route depends on `authorize`. It verifies the bearer token, loads the user
afresh (a deleted user or a changed role takes effect at once), refuses writes by read-only
users, and yields a `Principal` whose `scope` is handed to the store, which filters by it.
Handlers never filter by tenant themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated
from uuid import UUID

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from iiot.errors import AuthenticationError, InvalidRequest, NotFound, PermissionDenied
from iiot.model import Role, User
from iiot.security import LoginThrottle, TokenSigner, is_disabled_hash
from iiot.services import Services
from iiot.storage.base import Scope

__all__ = [
    "ApiState",
    "Auth",
    "Principal",
    "Svc",
    "api_state",
    "authorize",
    "get_services",
    "sysadmin_writes",
]

# Methods that never change anything: the only ones a tenant_user may call.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_bearer = HTTPBearer(auto_error=False, description="an access token from POST /api/auth/login")


@dataclass(slots=True)
class ApiState:
    """Per-app security state: token signer and login throttle."""

    signer: TokenSigner
    throttle: LoginThrottle
    dummy_password_hash: str | None = None  # lazily made; makes unknown users cost a bcrypt


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller."""

    user: User

    @property
    def scope(self) -> Scope:
        """The tenant scope for the store: None (all tenants) for sysadmins, else own tenant."""
        return None if self.user.role is Role.SYSADMIN else self.user.tenant_id

    @property
    def is_sysadmin(self) -> bool:
        """Whether the caller administers the whole platform."""
        return self.user.role is Role.SYSADMIN

    def tenant_for_create(self, requested: UUID | None) -> UUID:
        """The tenant a new object goes to: the caller's own, unless a sysadmin names one.

        A `tenant_id` sent by anybody else is ignored (contract), so it can never place an
        object in another tenant.
        """
        if self.user.tenant_id is not None:
            return self.user.tenant_id
        if requested is None:
            raise InvalidRequest("tenant_id is required when a sysadmin creates this")
        return requested

    def check_assignable(self, role: Role) -> None:
        """Refuse granting a role above the caller's own."""
        if role is Role.SYSADMIN and not self.is_sysadmin:
            raise PermissionDenied("only a sysadmin can grant the sysadmin role")


# Dependencies are `async def` even when they do not await: FastAPI runs a plain `def`
# dependency in a worker thread, and that hop cost more than the whole database query.
async def get_services(request: Request) -> Services:
    """The platform's services."""
    services: Services = request.app.state.services
    return services


async def api_state(request: Request) -> ApiState:
    """The app's security state."""
    state: ApiState = request.app.state.security
    return state


async def authorize(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller of a management route; read-only roles may only use safe methods."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise AuthenticationError("missing bearer token: log in at POST /api/auth/login")
    state: ApiState = request.app.state.security
    services: Services = request.app.state.services
    claims = state.signer.verify(credentials.credentials)
    try:
        user = await services.store.get_user(None, claims.user_id)
    except NotFound:
        raise AuthenticationError("the user of this access token no longer exists") from None
    if claims.version != user.token_version:
        raise AuthenticationError(
            "access token no longer valid (password or role changed): log in again"
        )
    if is_disabled_hash(user.password_hash):
        raise AuthenticationError("the user of this access token is disabled")
    if user.role is Role.TENANT_USER and request.method not in SAFE_METHODS:
        raise PermissionDenied("a tenant_user has read-only access")
    return Principal(user)


async def sysadmin_writes(
    request: Request, principal: Annotated[Principal, Depends(authorize)]
) -> None:
    """Routes under this dependency may be changed by sysadmins only (reads stay scoped)."""
    if request.method not in SAFE_METHODS and not principal.is_sysadmin:
        raise PermissionDenied("only a sysadmin can change tenants")


Auth = Annotated[Principal, Depends(authorize)]
Svc = Annotated[Services, Depends(get_services)]
