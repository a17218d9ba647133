"""Architecture rules, checked rather than remembered (as Home Assistant's hassfest does).

- Adapters translate protocols; they never import storage implementations or the API.
- Storage owns SQL; it never imports adapters, the API, the pipeline or the app.
- The codec is pure: no I/O libraries.
- Nothing is created at import time: no module-level settings, stores or apps.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "iiot"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def modules(folder: str) -> list[Path]:
    return sorted((SRC / folder).rglob("*.py")) if folder else sorted(SRC.glob("*.py"))


def violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(SRC)} imports {name}"
        for path in files
        for name in sorted(imports_of(path))
        if name.startswith(forbidden)
    ]


def test_adapters_do_not_reach_into_storage_or_the_api() -> None:
    forbidden = (
        "iiot.storage.sqlite",
        "iiot.storage.postgres",
        "iiot.api",
        "asyncpg",
        "sqlite3",
        "aiosqlite",
        "iiot.app",
    )
    assert violations(modules("adapters"), forbidden) == []


def test_storage_does_not_import_upper_layers() -> None:
    forbidden = (
        "iiot.adapters",
        "iiot.api",
        "iiot.pipeline",
        "iiot.app",
        "iiot.ingest",
        "iiot.registry",
        "iiot.cli",
    )
    assert violations(modules("storage"), forbidden) == []


def test_api_uses_storage_only_through_its_interface() -> None:
    forbidden = (
        "iiot.storage.sqlite",
        "iiot.storage.postgres",
        "iiot.adapters",
        "asyncpg",
        "sqlite3",
    )
    assert violations(modules("api"), forbidden) == []


@pytest.mark.parametrize("module", ["codec.py", "model.py", "errors.py"])
def test_pure_modules_do_no_io(module: str) -> None:
    forbidden = ("asyncio", "socket", "iiot.storage", "iiot.adapters", "iiot.api", "os")
    assert violations([SRC / module], forbidden) == []


def test_nothing_is_built_at_import_time() -> None:
    # Module-level calls that build long-lived objects belong in the composition root.
    builders = {
        "load_settings",
        "open_store",
        "create_api",
        "Platform",
        "Metrics",
        "FastAPI",
        "Settings",
        "LiveBus",
        "Pipeline",
    }
    offenders = []
    for path in SRC.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            if isinstance(value, ast.Call):
                func = value.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                if name in builders:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {name}()")
    assert offenders == []
