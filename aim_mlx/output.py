"""Output files: their locations checked before any work is done, and written atomically."""

from __future__ import annotations

import os
import tempfile
import uuid
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


def write_atomic(path: str | os.PathLike, write) -> Path:
    """Write `path` through `write(binary file)` into a temporary file beside it, then move that
    into place: a failure midway leaves the old file, or none, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
