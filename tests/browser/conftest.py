"""Browser tests: the console in Debian's Chromium, driven by Playwright, against a real platform.

Playwright's own browser download is not used: the system's `chromium` is launched through
`executable_path`. Every request the page makes is recorded, so a test can show that
nothing leaves the platform's origin; console errors and page errors are collected too.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from iiot.app import Platform
from tests.support import (
    ADMIN_PASSWORD,
    free_port,
    platform_env,
    running_platform,
    services_required,
)

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
# Tablet width, the narrowest screen the console is made for.
VIEWPORT = {"width": 1024, "height": 800}


def chromium_path() -> str:
    """The system Chromium (skip, or fail when services are required, without it)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    message = "Chromium is not installed (apt-get install chromium)"
    if services_required():
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Console:
    """A running platform, an admin API client and a browser page on the console."""

    platform: Platform
    base: str
    http: httpx.AsyncClient
    admin: dict[str, str]
    page: Any
    context: Any
    browser: Any
    mqtt_port: int
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def api(self, method: str, url: str, status: int = 200, **kwargs: Any) -> Any:
        """Call the REST API and insist on the status."""
        answer = await self.http.request(method, url, **kwargs)
        assert answer.status_code == status, f"{method} {url}: {answer.status_code} {answer.text}"
        return answer.json() if answer.content else None

    async def login_headers(self, username: str, password: str) -> dict[str, str]:
        """The bearer header of a user."""
        token = (
            await self.api(
                "POST", "/api/auth/login", json={"username": username, "password": password}
            )
        )["access_token"]
        return {"Authorization": f"Bearer {token}"}

    async def login(self, username: str = "admin", password: str = ADMIN_PASSWORD) -> None:
        """Log in through the login form."""
        await self.page.goto(self.base + "/")
        await self.page.get_by_label("Username").fill(username)
        await self.page.get_by_label("Password").fill(password)
        await self.page.get_by_role("button", name="Log in").click()
        await self.page.get_by_role("button", name="Log out").wait_for()

    async def screenshot(self, name: str, full_page: bool = False) -> None:
        """Save a screenshot for the docs."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)

    def foreign_requests(self) -> list[str]:
        """Requests the page made to any other origin."""
        origin = urlsplit(self.base)
        return [
            url
            for url in self.requests
            if not url.startswith(("data:", "blob:")) and urlsplit(url).netloc != origin.netloc
        ]

    def real_errors(self) -> list[str]:
        """Console errors, except Chromium's note of an API answer the page then showed.

        Chromium logs every 4xx fetch ("Failed to load resource"); the console shows those
        answers to the user (e.g. another tenant's device is "not found"), so they are not
        faults of the page. Anything else (script errors, CSP violations) is.
        """
        return [
            e for e in self.errors if not ("Failed to load resource" in e and "status of 4" in e)
        ]


def require_api(answer: httpx.Response, what: str) -> None:
    """Skip a test whose REST API is not part of this build (no such route or method)."""
    if answer.status_code in (404, 405) and answer.json().get("detail") in (
        "Not Found",
        "Method Not Allowed",
    ):
        pytest.skip(f"{what} is not in this build")


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[Console]:
    """The platform (HTTP and embedded MQTT on free ports) and a page in Chromium."""
    from playwright.async_api import async_playwright

    executable = chromium_path()
    http_port, mqtt_port = free_port(), free_port()
    env = platform_env(
        tmp_path,
        IIOT_HTTP_PORT=str(http_port),
        IIOT_MQTT_PORT=str(mqtt_port),
    )
    base = f"http://127.0.0.1:{http_port}"
    async with (
        running_platform(env) as platform,
        httpx.AsyncClient(base_url=base, timeout=30) as http,
        async_playwright() as pw,
    ):
        browser = await pw.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            context = await browser.new_context(viewport=VIEWPORT)
            page = await context.new_page()
            token = (
                await http.post(
                    "/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
                )
            ).json()["access_token"]
            con = Console(
                platform,
                base,
                http,
                {"Authorization": f"Bearer {token}"},
                page,
                context,
                browser,
                mqtt_port,
            )
            context.on("request", lambda r: con.requests.append(r.url))
            page.on("console", lambda m: con.errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: con.errors.append(f"page error: {e}"))
            yield con
        finally:
            with contextlib.suppress(Exception):
                await browser.close()
