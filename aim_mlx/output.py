"""Checking output locations before any work is done, for every command that writes files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import OutputError


def prepare_output(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Check that `path` (a file or a folder to be created) can be written, before any work.

    Missing parent folders are created. The parent must accept a new file (a probe file is
    created and removed, which also catches read-only file systems). An existing `path` is
    refused unless `force`. Raises OutputError naming the path.
    """
    path = Path(path).expanduser()
    if path.exists() and not force:
        raise OutputError(f"{path} already exists; choose another output or pass --force")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the folder {parent} for {path}: {_reason(e)}") from None
    check_writable(parent, f"cannot write {path}")
    return path


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Raise OutputError("{what}: ...") unless a file can be created in `folder`."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".aim-mlx-write-check-", dir=folder)
    except OSError as e:
        raise OutputError(f"{what}: {folder} is not writable ({_reason(e)})") from None
    os.close(fd)
    os.unlink(probe)


def _reason(error: OSError) -> str:
    return error.strerror or str(error)
