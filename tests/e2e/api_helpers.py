"""Helpers for the REST API end-to-end tests: a running platform and a logged-in client."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from iiot.app import Platform
from tests.support import ADMIN_PASSWORD, free_port, platform_env, running_platform

__all__ = ["ADMIN_PASSWORD", "Api", "api_platform", "bearer"]


def bearer(token: str) -> dict[str, str]:
    """The Authorization header of an access token."""
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Api:
    """An HTTP client of the running platform, with its sysadmin already logged in."""

    client: httpx.AsyncClient
    platform: Platform
    admin: dict[str, str]

    async def login(self, username: str, password: str) -> dict[str, str]:
        """Log in; returns the Authorization header."""
        answer = await self.client.post(
            "/api/auth/login", json={"username": username, "password": password}
        )
        assert answer.status_code == 200, answer.text
        return bearer(answer.json()["access_token"])

    async def ok(self, method: str, url: str, status: int = 200, **kwargs: Any) -> Any:
        """Call and insist on the status; returns the JSON answer (None when empty)."""
        answer = await self.client.request(method, url, **kwargs)
        assert answer.status_code == status, f"{method} {url}: {answer.status_code} {answer.text}"
        return answer.json() if answer.content else None

    async def tenant(self, name: str) -> dict[str, Any]:
        """Create a tenant as sysadmin."""
        result: dict[str, Any] = await self.ok(
            "POST", "/api/tenants", 201, json={"name": name}, headers=self.admin
        )
        return result

    async def user(
        self, username: str, role: str, tenant_id: str | None, password: str = "password-123"
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Create a user as sysadmin and log them in."""
        body = {"username": username, "password": password, "role": role, "tenant_id": tenant_id}
        user = await self.ok("POST", "/api/users", 201, json=body, headers=self.admin)
        return user, await self.login(username, password)

    async def device(self, headers: dict[str, str], name: str, **extra: Any) -> dict[str, Any]:
        """Create a device with the given caller; the answer holds its token."""
        result: dict[str, Any] = await self.ok(
            "POST", "/api/devices", 201, json={"name": name, **extra}, headers=headers
        )
        return result


@contextlib.asynccontextmanager
async def api_platform(data_dir: Path, **env: str) -> AsyncIterator[Api]:
    """The platform with only HTTP on, and a client whose sysadmin is logged in."""
    port = free_port()
    settings_env = platform_env(data_dir, IIOT_HTTP_PORT=str(port), **env)
    async with (
        running_platform(settings_env) as platform,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client,
    ):
        api = Api(client, platform, {})
        api.admin = await api.login("admin", ADMIN_PASSWORD)
        yield api
