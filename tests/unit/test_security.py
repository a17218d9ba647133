"""Passwords, device tokens, JWT access tokens and login throttling."""

from __future__ import annotations

import base64
import json
import os
import stat
import string
import time
import uuid
from pathlib import Path

import jwt
import pytest

import iiot.security
from iiot.errors import AuthenticationError, ConfigError
from iiot.model import Role
from iiot.security import (
    LoginThrottle,
    TokenSigner,
    TooManyAttempts,
    hash_password,
    hash_token,
    load_jwt_secret,
    new_device_token,
    verify_password,
)


def test_password_hash_round_trip() -> None:
    hashed = hash_password("correct horse", rounds=4)
    assert hashed.startswith("$2b$04$")
    assert verify_password("correct horse", hashed)
    assert not verify_password("wrong horse", hashed)


def test_password_default_cost_is_12() -> None:
    assert hash_password("x" * 8).startswith("$2b$12$")


def test_verify_refuses_garbage_hash_and_overlong_password() -> None:
    assert not verify_password("anything", "not-a-bcrypt-hash")
    assert not verify_password("x" * 100, hash_password("x" * 72, rounds=4))


def test_device_tokens_are_random_and_long() -> None:
    tokens = {new_device_token() for _ in range(1000)}
    assert len(tokens) == 1000
    for token in list(tokens)[:10]:
        assert len(base64.urlsafe_b64decode(token + "==")) * 8 >= 128
    token = next(iter(tokens))
    assert hash_token(token) == hash_token(token) != token
    assert len(hash_token(token)) == 64


def test_jwt_secret_created_once_with_mode_0600(tmp_path: Path) -> None:
    first = load_jwt_secret(tmp_path)
    path = tmp_path / "jwt-secret"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(first) >= 64
    assert load_jwt_secret(tmp_path) == first


def test_jwt_secrets_differ_between_installs(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert load_jwt_secret(tmp_path / "a") != load_jwt_secret(tmp_path / "b")


def test_short_jwt_secret_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "jwt-secret").write_text("short\n")
    with pytest.raises(ConfigError, match="jwt-secret"):
        load_jwt_secret(tmp_path)


def _signer(tmp_path: Path, ttl: int = 3600) -> TokenSigner:
    return TokenSigner(load_jwt_secret(tmp_path), ttl)


def test_token_round_trip(tmp_path: Path) -> None:
    signer = _signer(tmp_path)
    user, tenant = uuid.uuid4(), uuid.uuid4()
    claims = signer.verify(signer.issue(user, Role.TENANT_ADMIN, tenant))
    assert (claims.user_id, claims.role, claims.tenant_id) == (user, Role.TENANT_ADMIN, tenant)
    assert claims.expires_at > time.time() + 3500
    sysadmin = signer.verify(signer.issue(user, Role.SYSADMIN, None))
    assert sysadmin.tenant_id is None


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_alg_none_is_refused(tmp_path: Path) -> None:
    signer = _signer(tmp_path)
    claims = {
        "sub": str(uuid.uuid4()),
        "role": "sysadmin",
        "tid": None,
        "iat": int(time.time()),
        "exp": int(time.time()) + 60,
    }
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."
    with pytest.raises(AuthenticationError):
        signer.verify(unsigned)


def test_wrong_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    token = _signer(tmp_path / "other").issue(uuid.uuid4(), Role.SYSADMIN, None)
    with pytest.raises(AuthenticationError, match="invalid"):
        _signer(tmp_path).verify(token)


def test_tampered_token_is_refused(tmp_path: Path) -> None:
    signer = _signer(tmp_path)
    token = signer.issue(uuid.uuid4(), Role.TENANT_USER, uuid.uuid4())
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["role"] = "sysadmin"
    with pytest.raises(AuthenticationError):
        signer.verify(f"{header}.{_b64(claims)}.{signature}")


def test_other_algorithm_with_same_key_is_refused(tmp_path: Path) -> None:
    secret = load_jwt_secret(tmp_path)
    token = jwt.encode(
        {
            "sub": str(uuid.uuid4()),
            "role": "sysadmin",
            "iat": int(time.time()),
            "exp": int(time.time()) + 60,
        },
        secret,
        algorithm="HS512",
    )
    with pytest.raises(AuthenticationError):
        TokenSigner(secret, 60).verify(token)


def test_expired_token_is_refused(tmp_path: Path) -> None:
    secret = load_jwt_secret(tmp_path)
    now = int(time.time())
    token = jwt.encode(
        {"sub": str(uuid.uuid4()), "role": "sysadmin", "iat": now - 7200, "exp": now - 3600},
        secret,
        algorithm="HS256",
    )
    with pytest.raises(AuthenticationError, match="expired"):
        TokenSigner(secret, 60).verify(token)


@pytest.mark.parametrize("missing", ["exp", "iat", "sub"])
def test_token_without_required_claim_is_refused(tmp_path: Path, missing: str) -> None:
    secret = load_jwt_secret(tmp_path)
    now = int(time.time())
    claims = {"sub": str(uuid.uuid4()), "role": "sysadmin", "iat": now, "exp": now + 60}
    del claims[missing]
    with pytest.raises(AuthenticationError):
        TokenSigner(secret, 60).verify(jwt.encode(claims, secret, algorithm="HS256"))


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "Bearer x", "e30.e30.e30"])
def test_garbage_tokens_are_refused(tmp_path: Path, garbage: str) -> None:
    with pytest.raises(AuthenticationError):
        _signer(tmp_path).verify(garbage)


def test_signer_refuses_a_weak_key() -> None:
    with pytest.raises(ValueError):
        TokenSigner(b"short", 60)


def test_throttle_per_user_and_address() -> None:
    throttle = LoginThrottle(max_failures=3, window_s=60)
    for _ in range(3):
        throttle.check("alice", "10.0.0.1")
        throttle.failed("alice", "10.0.0.1")
    with pytest.raises(TooManyAttempts) as raised:
        throttle.check("alice", "10.0.0.1")  # this user from this address
    assert 1 <= raised.value.retry_after <= 60
    with pytest.raises(TooManyAttempts, match="address"):
        throttle.check("bob", "10.0.0.1")  # and the address for any user
    throttle.check("bob", "10.0.0.2")


def test_failures_from_one_address_do_not_lock_the_user_out_elsewhere() -> None:
    throttle = LoginThrottle(max_failures=3, window_s=60)
    for _ in range(50):
        throttle.failed("admin", "10.6.6.6")
    throttle.check("admin", "10.0.0.2")  # the real admin, from their own address


def test_repeated_failures_back_off_exponentially() -> None:
    throttle = LoginThrottle(max_failures=3, window_s=60)
    waits = []
    for _ in range(8):
        throttle.failed("alice", "10.0.0.1")
        try:
            throttle.check("alice", "10.0.0.1")
        except TooManyAttempts as exc:
            waits.append(exc.retry_after)
    assert waits == sorted(waits) and waits[-1] >= 4 * waits[0]
    assert waits[-1] <= 900


def test_throttle_window_expires() -> None:
    throttle = LoginThrottle(max_failures=1, window_s=0.05)
    throttle.failed("alice", "a")
    with pytest.raises(TooManyAttempts):
        throttle.check("alice", "a")
    time.sleep(0.06)
    throttle.check("alice", "a")


def test_success_clears_the_user_count() -> None:
    throttle = LoginThrottle(max_failures=2, window_s=60)
    throttle.failed("alice", "a")
    throttle.succeeded("alice", "a")
    assert ("alice", "a") not in throttle._pairs
    throttle.check("alice", "a")


def test_throttle_memory_is_bounded_but_keeps_addresses() -> None:
    throttle = LoginThrottle(max_failures=5, window_s=60, max_keys=100)
    for i in range(1000):
        throttle.failed(f"user{i}", "attacker")
    assert len(throttle._failures) <= 101
    with pytest.raises(TooManyAttempts, match="address"):
        throttle.check("someone", "attacker")


def test_generated_secrets_never_start_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # One in 64 random texts starts with "-", which a command line then takes for an option
    # (`uals --password -x...` failed the README's OPC UA block now and then).
    drawn = iter(["-starts-with-a-dash", "fine-text"])
    monkeypatch.setattr(iiot.security.secrets, "token_urlsafe", lambda nbytes: next(drawn))
    assert iiot.security.random_secret(18) == "fine-text"


def test_device_tokens_are_long_url_safe_and_never_start_with_a_dash() -> None:
    tokens = [iiot.security.new_device_token() for _ in range(500)]
    assert all(len(t) == 32 and not t.startswith("-") for t in tokens)
    assert all(set(t) <= set(string.ascii_letters + string.digits + "-_") for t in tokens)
