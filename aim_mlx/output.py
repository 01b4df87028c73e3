"""Output files: their locations checked before any work is done, and written atomically."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError


def prepare_output(
    path: str | os.PathLike,
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    replaceable: Callable[[Path], bool] | None = None,
    cache_entry: bool = False,
) -> Path:
    """Check that `path` can be written, before any work; return it absolute, `~` expanded and
    links resolved (an output given as a link replaces what it points to): write there.

    `path` is a file, or a folder when `replaceable` is given. It is never one of `inputs`
    (files or folders the command reads; None entries are skipped), a folder holding one or
    anything inside one (a model's folder, training images, where it would be read as data).
    Missing parent folders are created, and the parent must accept a new file (a probe file is
    created and removed, which also catches read-only file systems). An existing `path` is
    refused unless `force`, and even then never a folder where a file goes (or the reverse),
    and an existing folder is replaced only when it is empty or `replaceable(folder)` says it is
    this kind of output: `--force` never deletes a folder of photos or checkpoints. It is never
    inside the cache's models/ or features/ folders (`cache rm` would delete it), unless
    `cache_entry`. Raises OutputError naming the path as given.
    """
    given = Path(path).expanduser()
    path = Path(os.path.realpath(given))  # links and `..` resolved as the file system does
    try:
        remove_leftovers(path)
        _check_inputs(given, path, [p for p in inputs if p is not None])
        if not cache_entry:
            _check_outside_cache(given, path)
        _check_replaceable(given, path, force, replaceable)
    except OSError as e:  # e.g. a name too long for the file system
        if isinstance(e, OutputError):
            raise
        raise OutputError(f"cannot use {given}: {_reason(e)}") from None
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the folder {parent} for {given}: {_reason(e)}") from None
    check_writable(parent, f"cannot write {given}")
    _check_name_length(path)
    return path


def _check_inputs(given: Path, path: Path, inputs: list) -> None:
    """OutputError if `path` (resolved) is an input, holds one or lies inside one."""
    for source in inputs:
        source = Path(source).expanduser()
        if not source.exists():  # e.g. a model name, not a path
            continue
        real_source = Path(os.path.realpath(source))
        if path == real_source:
            what = "is"
        elif path in real_source.parents:
            what = "holds"
        elif real_source in path.parents:
            what = "is inside"
        else:
            continue
        raise OutputError(f"the output {given} {what} the input {source}; choose another output")


def _check_outside_cache(given: Path, path: Path) -> None:
    """OutputError if `path` lies in a folder the cache manages (listed and removed by `cache`)."""
    from .cache import _default_root  # not cache_root(): a cache setting that is not a
    # folder matters only to commands that use the cache (cache imports this module)

    root = _default_root()
    for folder in (root / "models", root / "features"):
        if Path(os.path.realpath(folder)) in path.parents:
            raise OutputError(
                f"the output {given} is inside the cache folder {folder} (`aim-mlx cache rm` "
                "deletes what is there); choose another output"
            )


def _check_replaceable(given: Path, path: Path, force: bool, replaceable) -> None:
    if not path.exists():
        return
    if not force:
        raise OutputError(f"{given} already exists; choose another output or pass --force")
    if replaceable is None and path.is_dir():
        raise OutputError(f"{given} is a folder, not a file; choose another output")
    if replaceable is not None and not path.is_dir():
        raise OutputError(f"{given} is a file, not a folder; choose another output")
    if replaceable is not None and any(path.iterdir()) and not replaceable(path):
        raise OutputError(
            f"{given} is a folder this command did not write; --force replaces only its own "
            "outputs: choose another output, or remove the folder yourself"
        )


# Temporary names beside an output add up to this many bytes to its name.
_TEMP_NAME_EXTRA = 48


def _check_name_length(path: Path) -> None:
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(path.name))
    if size + _TEMP_NAME_EXTRA > limit:
        raise OutputError(
            f"the name {path.name!r} is too long ({size} bytes; at most "
            f"{limit - _TEMP_NAME_EXTRA} here); choose a shorter one"
        )


def _this_machine() -> str:
    """A short tag of this machine (its machine id and host name): temporary names carry it,
    so that machines sharing a disk (an NFS home) never judge each other's processes."""
    try:
        ident = Path("/etc/machine-id").read_text().strip()
    except OSError:
        ident = ""
    return hashlib.sha1(f"{ident}/{socket.gethostname()}".encode()).hexdigest()[:6]


MACHINE = _this_machine()


def _owner() -> str:
    """PID-RANDOM-MACHINE: which process, on which machine, a temporary name belongs to."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}-{MACHINE}"


def temp_path(out: Path, keep_suffix: bool = False) -> Path:
    """A hidden name beside `out` to write it under, `.NAME.partial-PID-RANDOM-MACHINE` (and
    `out`'s suffix with `keep_suffix`): what `remove_leftovers` removes once the process is
    gone."""
    suffix = out.suffix if keep_suffix else ""
    return out.with_name(f".{out.name}.partial-{_owner()}{suffix}")


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder `tmp` to `out`; an `out` already there (replaced with --force)
    is moved aside first and removed once the new one is in place. Ctrl-C and SIGTERM wait
    until one of the two is in place; after a SIGKILL, `remove_leftovers` puts the old one back."""
    old = out.with_name(f".{out.name}.old-{_owner()}")
    try:
        with signals_held():
            if out.exists():
                out.rename(old)
            try:
                tmp.rename(out)
            except OSError:
                if old.exists() and not out.exists():
                    old.rename(out)
                raise
    finally:
        if out.exists() and old.exists():  # the new one in place (a held signal is raised now)
            _delete(old, out)


def remove_leftovers(out: Path) -> None:
    """Clear what killed (SIGKILL) processes left beside `out`: their partial outputs
    (`temp_path`), and old outputs they had moved aside to replace them, which are put back
    when `out` is missing (the process died between the two renames) and removed otherwise."""
    for path, kind in dead_leftovers(out.parent, out.name):
        try:
            old_folder = kind == "old" and path.is_dir() and not path.is_symlink()
            if old_folder and not out.exists() and not out.is_symlink():
                path.rename(out)
            elif old_folder:
                _delete(path, out)
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        except OSError:  # another user's, in a shared folder: not this run's to clear
            continue


def _delete(old: Path, out: Path) -> None:
    """Delete an old output moved aside: renamed to a partial name first, so that a kill while
    deleting leaves a leftover to remove, never half an old output to put back."""
    doomed = temp_path(out)
    old.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


_LEFTOVER = re.compile(
    r"\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[0-9a-f]{8}(-(?P<machine>[0-9a-f]{6}))?"
    r"(\.[^.]*)?"
)


def dead_leftovers(folder: Path, name: str | None = None) -> list[tuple[Path, str]]:
    """(path, "partial" or "old") for the temporary names in `folder` (beside `name`, or any
    file) of this machine's processes that are gone (names without a machine: older runs')."""
    pattern = f".{glob.escape(name)}.*-*" if name else ".*-*"
    found = []
    for path in folder.glob(pattern):
        m = _LEFTOVER.fullmatch(path.name)
        if not m or (name is not None and m["name"] != name):
            continue
        if m["machine"] in (None, MACHINE) and not process_alive(int(m["pid"])):
            found.append((path, m["kind"]))
    return found


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    except OverflowError:  # not a PID
        return False
    return True


@contextmanager
def signals_held():
    """Hold back SIGINT and SIGTERM until the block ends, then deliver them: for steps that
    must not be cut in two (replacing an output)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda n, _: caught.append(n)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
    for s in caught:
        signal.raise_signal(s)


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
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
