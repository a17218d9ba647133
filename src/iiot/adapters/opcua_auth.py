"""OPC UA login with platform credentials (bcrypt, checked in a thread).

asyncua asks its user manager synchronously, from inside session activation, so the slow
bcrypt check cannot run there without stalling the event loop. Instead the transport
(`opcua_transport`) calls `preverify` with the decrypted credentials just before asyncua
activates the session; the verdict is kept for a few seconds and `get_user` only looks it up.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager

from iiot.errors import StorageUnavailable
from iiot.model import Role
from iiot.security import LoginThrottle, TooManyAttempts, hash_password, verify_password
from iiot.services import Services

if TYPE_CHECKING:
    from asyncua.server.internal_server import InternalServer

__all__ = ["PlatformUser", "PlatformUserManager"]

log = logging.getLogger(__name__)

# How long a verdict waits for asyncua's activation to pick it up (it follows at once).
_VERDICT_TTL_S = 30.0
_MAX_VERDICTS = 10_000


@dataclass
class PlatformUser(User):
    """An OPC UA session's user: which tenant it may see and whether it may change things."""

    tenant_id: UUID | None = None  # None with sysadmin: every tenant
    platform_role: Role | None = None  # None: anonymous (only when explicitly allowed)
    user_id: UUID | None = None  # the platform user (None: anonymous)

    @property
    def all_tenants(self) -> bool:
        """Whether this user sees every tenant (a sysadmin)."""
        return self.platform_role is Role.SYSADMIN

    def can_see(self, tenant_id: UUID | None) -> bool:
        """Whether nodes of this tenant are visible (None: a node of no tenant).

        An anonymous session (IIOT_OPCUA_ALLOW_NONE=1) and a user deleted since login see
        no tenant at all: only the server's own nodes.
        """
        if tenant_id is None:
            return True
        if self.platform_role is None:
            return False
        return self.platform_role is Role.SYSADMIN or self.tenant_id == tenant_id

    def can_change(self, tenant_id: UUID) -> bool:
        """Whether this user may change a device of this tenant (as the REST API allows)."""
        if self.platform_role is Role.SYSADMIN:
            return True
        return self.platform_role is Role.TENANT_ADMIN and self.tenant_id == tenant_id


class PlatformUserManager(UserManager):
    """asyncua user manager backed by the platform's users."""

    def __init__(self, services: Services, allow_anonymous: bool) -> None:
        self._store = services.store
        self._metrics = services.metrics
        self._allow_anonymous = allow_anonymous
        self._throttle = LoginThrottle(services.settings.login_attempts_per_minute)
        self._secret = secrets.token_bytes(32)  # keys verdicts without keeping passwords
        self._verdicts: dict[bytes, tuple[float, PlatformUser | None]] = {}
        # Compared against when the username is unknown, so both cases take as long.
        self._dummy_hash = hash_password(secrets.token_urlsafe(16), services.settings.bcrypt_rounds)

    def _key(self, username: str, password: str) -> bytes:
        message = username.encode("utf-8") + b"\0" + password.encode("utf-8")
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    async def preverify(self, username: str, password: str, address: str = "") -> None:
        """Check credentials (bcrypt in a thread) and keep the verdict for `get_user`."""
        try:
            # Throttled per username and client address, as REST logins are.
            self._throttle.check(username, address)
        except TooManyAttempts as exc:
            self._metrics.auth_failures.labels("opcua").inc()
            log.info("OPC UA login of %r refused: %s", username, exc)
            user = None
        else:
            user = await self._verify(username, password)
            if user is None:
                self._throttle.failed(username, address)
            else:
                self._throttle.succeeded(username, address)
        now = time.monotonic()
        if len(self._verdicts) >= _MAX_VERDICTS:
            self._verdicts = {k: v for k, v in self._verdicts.items() if v[0] > now}
            if len(self._verdicts) >= _MAX_VERDICTS:
                self._verdicts.clear()
        self._verdicts[self._key(username, password)] = (now + _VERDICT_TTL_S, user)

    async def _verify(self, username: str, password: str) -> PlatformUser | None:
        try:
            record = await self._store.find_user(username)
        except StorageUnavailable:
            log.warning("OPC UA login of %r refused: the database is unavailable", username)
            return None
        stored_hash = record.password_hash if record is not None else self._dummy_hash
        ok = await asyncio.to_thread(verify_password, password, stored_hash)
        if record is None or not ok:
            self._metrics.auth_failures.labels("opcua").inc()
            log.info("OPC UA login refused for %r", username)
            return None
        return PlatformUser(
            role=UserRole.User,
            name=record.username,
            tenant_id=record.tenant_id,
            platform_role=record.role,
            user_id=record.id,
        )

    async def refresh(self, user: PlatformUser) -> None:
        """Bring a session's user up to date: a deleted user loses every right, a demoted
        or moved one keeps only the new role's (as the REST API reloads users per call)."""
        if user.user_id is None:
            return
        try:
            record = await self._store.find_user(user.name or "")
        except StorageUnavailable:
            return  # keep what the session had; the next request tries again
        if record is None or record.id != user.user_id:
            user.platform_role = None
            user.tenant_id = None
            user.user_id = None
            return
        user.platform_role = record.role
        user.tenant_id = record.tenant_id

    def get_user(
        self,
        iserver: InternalServer,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        """The session's user (asyncua calls this while activating a session)."""
        if username is None:
            if not self._allow_anonymous:
                return None
            return PlatformUser(role=UserRole.User, name="anonymous")
        verdict = self._verdicts.pop(self._key(username, password or ""), None)
        if verdict is None or verdict[0] < time.monotonic():
            return None  # not pre-verified (should not happen): refuse rather than block
        return verdict[1]
