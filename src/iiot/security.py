"""Passwords (bcrypt), device tokens (SHA-256 hashed), JWT access tokens, login throttling."""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import bcrypt
import jwt

from iiot.errors import AuthenticationError, ConfigError, PermissionDenied
from iiot.model import Role

__all__ = [
    "JWT_ALGORITHM",
    "MAX_PASSWORD_BYTES",
    "MIN_PASSWORD_BYTES",
    "AccessClaims",
    "LoginThrottle",
    "TokenSigner",
    "TooManyAttempts",
    "hash_password",
    "hash_token",
    "load_jwt_secret",
    "new_device_token",
    "verify_password",
]

# bcrypt only reads the first 72 bytes of a password; longer ones are refused upstream.
MAX_PASSWORD_BYTES = 72
MIN_PASSWORD_BYTES = 8
# The only algorithm accepted: a fixed list means `alg=none` or RS/HS confusion cannot apply.
JWT_ALGORITHM = "HS256"
_SECRET_BYTES = 32
# Clock skew allowed on `exp` and `iat`.
_LEEWAY_S = 5
# Verified access tokens remembered per process (see TokenSigner.verify).
_MAX_VERIFIED = 10_000


def hash_password(password: str, rounds: int = 12) -> str:
    """A bcrypt hash of the password."""
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds)).decode("ascii")


def verify_password(password: str, password_hash: str) -> bool:
    """Whether the password matches the bcrypt hash (constant time)."""
    try:
        return bcrypt.checkpw(password.encode("utf-8"), password_hash.encode("ascii"))
    except ValueError:  # a password over 72 bytes or a malformed hash: never a match
        return False


# A disabled user's password hash is kept behind this mark (as in /etc/shadow): no password
# matches it, and removing the mark restores the login (`iiot user disable` / `enable`).
DISABLED_MARK = "!"


def is_disabled_hash(password_hash: str) -> bool:
    """Whether this stored password hash belongs to a disabled user."""
    return password_hash.startswith(DISABLED_MARK)


def random_secret(nbytes: int) -> str:
    """URL-safe random text of `nbytes` random bytes that never starts with `-`, so it can
    follow an option on any command line (`mosquitto_pub -u`, `uals --password`)."""
    while (text := secrets.token_urlsafe(nbytes)).startswith("-"):
        pass
    return text


def new_device_token() -> str:
    """A random device access token of 192 bits, URL-safe."""
    return random_secret(24)


def hash_token(token: str) -> str:
    """The stored form of a device token.

    Tokens carry 192 random bits, so a fast hash is safe and lets every message be checked
    without bcrypt's deliberate slowness.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# --- JWT access tokens -------------------------------------------------------------------


def load_jwt_secret(data_dir: Path) -> bytes:
    """The install's JWT signing key from `{data_dir}/jwt-secret`, created (mode 0600) if absent."""
    path = data_dir / "jwt-secret"
    try:
        # O_EXCL: when several processes start at once, exactly one writes the key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(
            f"IIOT_DATA_DIR={str(data_dir)!r}: cannot create {path} ({exc.strerror})"
        ) from None
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(_SECRET_BYTES) + "\n")
    for _ in range(50):  # another process may have created the file but not yet written it
        try:
            text = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} cannot be read: {exc}") from None
        if text:
            break
        time.sleep(0.01)
    if len(text) < 2 * _SECRET_BYTES:
        raise ConfigError(
            f"{path} holds a key of {len(text)} characters; expected at least "
            f"{2 * _SECRET_BYTES} (delete it to generate a new one; every login is then invalid)"
        )
    return text.encode("ascii")


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """What a verified access token says: who, with which role, in which tenant."""

    user_id: UUID
    role: Role
    tenant_id: UUID | None
    expires_at: int  # Unix seconds
    version: int = 0  # the user's token version when issued (see User.token_version)


class TokenSigner:
    """Issues and verifies HS256 access tokens with the install's secret."""

    def __init__(self, secret: bytes, ttl_s: int) -> None:
        if len(secret) < 32:
            raise ValueError("the JWT secret must be at least 32 bytes")
        self._secret = secret
        self.ttl_s = ttl_s
        # Tokens whose signature was checked: every API request carries one, and the check
        # (PyJWT decoding and HMAC) was a visible share of a small request's CPU. A token's
        # claims never change, so only the expiry is checked again. Bounded, emptied when
        # full. Who the user is *now* (deleted, role changed) is still read per request.
        self._verified: dict[str, AccessClaims] = {}

    def issue(self, user_id: UUID, role: Role, tenant_id: UUID | None, version: int = 0) -> str:
        """A signed access token valid for `ttl_s` seconds."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": str(user_id),
            "role": role.value,
            "tid": None if tenant_id is None else str(tenant_id),
            "ver": version,
            "iat": now,
            "exp": now + self.ttl_s,
        }
        return jwt.encode(claims, self._secret, algorithm=JWT_ALGORITHM)

    def verify(self, token: str) -> AccessClaims:
        """The claims of a valid token; `AuthenticationError` for any bad, foreign or old one."""
        known = self._verified.get(token)
        if known is not None:
            # The same rule as PyJWT's: expired once exp <= now - leeway.
            if known.expires_at <= time.time() - _LEEWAY_S:
                del self._verified[token]
                raise AuthenticationError("access token expired: log in again")
            return known
        claims = self._decode(token)
        if len(self._verified) >= _MAX_VERIFIED:
            self._verified.clear()
        self._verified[token] = claims
        return claims

    def _decode(self, token: str) -> AccessClaims:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[JWT_ALGORITHM],
                options={"require": ["exp", "iat", "sub"]},
                leeway=_LEEWAY_S,
            )
            return AccessClaims(
                user_id=UUID(str(claims["sub"])),
                role=Role(claims["role"]),
                tenant_id=None if claims.get("tid") is None else UUID(str(claims["tid"])),
                expires_at=int(claims["exp"]),
                version=int(claims.get("ver", 0)),
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("access token expired: log in again") from None
        except jwt.ImmatureSignatureError:
            raise AuthenticationError("access token issued in the future") from None
        except (jwt.InvalidTokenError, KeyError, ValueError, TypeError):
            raise AuthenticationError("invalid access token") from None


# --- login throttling --------------------------------------------------------------------


class TooManyAttempts(PermissionDenied):
    """Too many failed logins for this user or address; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LoginThrottle:
    """Throttles failed logins per (username, client address), with backoff, and per address.

    A username alone is never locked: anyone could then lock `admin` out by failing on
    purpose. Instead each (username, address) pair may fail `max_failures` times in a
    window; after that it waits, twice as long after every further failure (up to
    `max_backoff_s`). An address is also limited to `max_failures` failures per window
    whatever the usernames (password spraying). A throttled attempt is refused without
    checking the password, so guessing costs no bcrypt time.
    """

    def __init__(
        self,
        max_failures: int,
        window_s: float = 60.0,
        max_keys: int = 100_000,
        max_backoff_s: float = 900.0,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_backoff_s = max_backoff_s
        self._max_keys = max_keys
        self._failures: dict[str, deque[float]] = {}  # address -> failure times
        self._pairs: dict[tuple[str, str], tuple[int, float]] = {}  # -> (failures, last)

    def check(self, username: str, address: str) -> None:
        """Raise `TooManyAttempts` when this user from this address, or the address, waits."""
        now = time.monotonic()
        pair = self._pair(username, address, now)
        if pair is not None:
            wait = self._delay(pair[0])
            if wait > 0 and now < pair[1] + wait:
                retry = max(1, int(pair[1] + wait - now + 0.999))
                raise TooManyAttempts(
                    f"too many failed logins for this user from this address: retry in {retry} s",
                    retry,
                )
        window = self._window(f"a:{address}", now)
        if window is not None and len(window) >= self.max_failures:
            retry = max(1, int(window[0] + self.window_s - now + 0.999))
            raise TooManyAttempts(
                f"too many failed logins from this address: retry in {retry} s", retry
            )

    def failed(self, username: str, address: str) -> None:
        """Record one failed login."""
        now = time.monotonic()
        if len(self._failures) + len(self._pairs) >= self._max_keys:
            self._prune(now)
        pair = self._pair(username, address, now)
        self._pairs[(username, address)] = ((pair[0] if pair else 0) + 1, now)
        self._failures.setdefault(f"a:{address}", deque()).append(now)

    def succeeded(self, username: str, address: str = "") -> None:
        """Forget the failures of this user from this address (the address keeps its count)."""
        self._pairs.pop((username, address), None)

    def _delay(self, failures: int) -> float:
        """How long a pair waits after its last failure: 0 below the limit, then doubling."""
        extra = failures - self.max_failures
        if extra < 0:
            return 0.0
        return float(min(self.max_backoff_s, self.window_s / 60.0 * 2.0**extra))

    def _pair(self, username: str, address: str, now: float) -> tuple[int, float] | None:
        pair = self._pairs.get((username, address))
        if pair is None:
            return None
        # Forgotten once quiet for a window beyond its current wait.
        if now - pair[1] >= self.window_s + self._delay(pair[0]):
            del self._pairs[(username, address)]
            return None
        return pair

    def _window(self, key: str, now: float) -> deque[float] | None:
        window = self._failures.get(key)
        if window is None:
            return None
        while window and window[0] <= now - self.window_s:
            window.popleft()
        if not window:
            del self._failures[key]
            return None
        return window

    def _prune(self, now: float) -> None:
        for key in list(self._failures):
            self._window(key, now)
        for username, address in list(self._pairs):
            self._pair(username, address, now)
        if len(self._failures) + len(self._pairs) >= self._max_keys:
            # Still full (a flood of made-up usernames): drop per-user counts rather than
            # grow; per-address counts stay, so the flooding address remains throttled.
            self._pairs.clear()
