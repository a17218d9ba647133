"""The `iiot` command as a user runs it: a child process through the real entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

__all__ = ["clean_environ", "iiot", "wait_until"]

T = TypeVar("T")
WAIT_S = 15.0  # upper bound of every wait (never reached when things work)


def clean_environ(env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without its IIOT_* settings, plus `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    return {**base, **env}


def iiot(
    env: Mapping[str, str], *args: str, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m iiot ARGS` (the installed entry point's code) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "iiot", *args],
        env=clean_environ(env),
        cwd=cwd,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=120,
    )


def wait_until(probe: Callable[[], T | None], what: str, timeout_s: float = WAIT_S) -> T:
    """Call `probe` until it returns something (not None); fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.2)
