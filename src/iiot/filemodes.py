"""File modes of what the platform keeps: secrets and the database are its owner's only."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

__all__ = ["secure_data_dir", "secure_file"]

log = logging.getLogger(__name__)


def secure_data_dir(path: Path) -> None:
    """Make the data directory 0700: it holds password and token hashes and private keys."""
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)
    except OSError as exc:  # not our directory (a shared mount): say so, keep running
        log.warning("cannot make %s private (mode 0700): %s", path, exc.strerror)


def secure_file(path: Path) -> None:
    """Create `path` empty with mode 0600 if missing, else take group and other access away."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except OSError as exc:
        log.warning("cannot make %s private (mode 0600): %s", path, exc.strerror)
