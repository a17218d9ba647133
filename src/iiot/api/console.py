"""The web console and the API docs, served from files inside the package.

Everything the browser loads comes from this origin: the console's ES modules, the vendored
uPlot, Swagger UI and ReDoc. A Content-Security-Policy on these responses forbids any
other origin, so `/` and `/docs` work on a plant network without internet.
"""

from __future__ import annotations

from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

__all__ = ["CONSOLE_CSP", "DOCS_CSP", "install_console"]

# The console: only this origin, no inline script, no framing.
CONSOLE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
# Swagger UI and ReDoc set inline styles and ReDoc runs a worker from a blob: still no
# other origin.
DOCS_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; font-src 'self' data:; "
    "worker-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONSOLE_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

_SWAGGER = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} - API docs</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/console/vendor/swagger-ui/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/console/vendor/swagger-ui/swagger-ui-bundle.js"></script>
<script src="/console/docs/swagger-init.js"></script></body></html>
"""

_REDOC = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} - API reference</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><div id="redoc"></div>
<script src="/console/vendor/redoc/redoc.standalone.js"></script>
<script src="/console/docs/redoc-init.js"></script></body></html>
"""


class _ConsoleFiles(StaticFiles):
    """Static files with the console's security headers; revalidated, never stale."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(_HEADERS)
        response.headers.setdefault("Cache-Control", "no-cache")
        return response


def _static_dir() -> Path:
    # The package is installed as files (not zipped), so this path stays valid.
    with as_file(files("iiot") / "static") as path:
        return Path(path)


def install_console(api: FastAPI) -> None:
    """Serve the console at `/` (files under `/console/`) and offline `/docs`, `/redoc`."""
    static = _static_dir()
    title = api.title

    async def index() -> FileResponse:
        return FileResponse(
            static / "index.html", headers={**_HEADERS, "Cache-Control": "no-cache"}
        )

    async def swagger() -> HTMLResponse:
        return HTMLResponse(
            _SWAGGER.format(title=title), headers={**_HEADERS, "Content-Security-Policy": DOCS_CSP}
        )

    async def redoc() -> HTMLResponse:
        return HTMLResponse(
            _REDOC.format(title=title), headers={**_HEADERS, "Content-Security-Policy": DOCS_CSP}
        )

    routes: list[tuple[str, Any]] = [("/", index), ("/docs", swagger), ("/redoc", redoc)]
    for path, endpoint in routes:
        api.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False)
    api.mount("/console", _ConsoleFiles(directory=static), name="console")
