"""Output files: their locations checked before any work is done, and written atomically."""

from __future__ import annotations

import ctypes
import errno
import functools
import glob
import hashlib
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

try:
    import fcntl
except ImportError:  # not a POSIX system: outputs are replaced without the folder's lock
    fcntl = None


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


def move_into_place(tmp: Path, out: Path, replace: bool = True) -> None:
    """Rename the finished folder `tmp` to `out`. With `replace`, an `out` already there is
    moved aside first and removed once the new one is in place; Ctrl-C and SIGTERM wait until
    one of the two is in place; after a SIGKILL, `remove_leftovers` puts the old one back.
    Without it, an `out` that appeared since `prepare_output` is kept: OutputError
    (`rename_new`)."""
    if not replace:
        with signals_held():
            rename_new(tmp, out)
        return
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


def rename_new(src: Path, dst: Path) -> None:
    """Rename the file or folder `src` to `dst` only if nothing is there, in one step: what
    another process put there since the output was checked is never replaced. OutputError
    naming `dst` if something is there (`src` is left for the caller to remove)."""
    try:
        if not _rename_noreplace(src, dst):
            _rename_reserved(src, dst)
    except FileExistsError:
        raise OutputError(
            f"{dst} appeared while this command ran (another process?) and is kept; choose "
            "another output, or pass --force to replace it"
        ) from None


def place_file(tmp: Path, path: Path, replace: bool) -> None:
    """Rename the finished file `tmp` to `path`: over a file there (`replace`), else only where
    nothing is (`rename_new`)."""
    if replace:
        os.replace(tmp, path)
    else:
        rename_new(tmp, path)


_NOT_SUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP)


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """The system's rename that never replaces (Linux renameat2 RENAME_NOREPLACE, macOS
    renamex_np RENAME_EXCL): True once renamed, False where there is none (nothing done);
    FileExistsError if `dst` exists."""
    rename = _noreplace_call()
    if rename is None:
        return False
    if rename(os.fsencode(src), os.fsencode(dst)) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NOT_SUPPORTED:  # an old kernel, or a file system without it (NFS, FUSE)
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


@functools.cache
def _noreplace_call():
    if sys.platform not in ("linux", "darwin"):  # elsewhere: the portable way
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if sys.platform == "linux" and hasattr(libc, "renameat2"):  # glibc 2.28+
        call = libc.renameat2
        int_, path, flags = ctypes.c_int, ctypes.c_char_p, ctypes.c_uint
        call.argtypes = [int_, path, int_, path, flags]
        at_fdcwd, noreplace = -100, 1
        return lambda src, dst: call(at_fdcwd, src, at_fdcwd, dst, noreplace)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        call = libc.renamex_np
        call.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        rename_excl = 0x4
        return lambda src, dst: call(src, dst, rename_excl)
    return None


def _rename_reserved(src: Path, dst: Path) -> None:
    """`rename_new` without the system's call: a file is given the second name `dst` (a hard
    link, never made over anything) and loses the first. Elsewhere the name is reserved first
    (an empty folder or file, made only if nothing is there) and `src` renamed over it; a rename
    never replaces a folder that is not empty, so only the empty reservation can be lost."""
    folder = src.is_dir()
    if not folder:
        try:
            os.link(src, dst, follow_symlinks=False)
        except FileExistsError:
            raise
        except OSError:  # no hard links here (FAT, some network disks)
            pass
        else:
            os.unlink(src)
            return
    if folder:
        os.mkdir(dst)
    else:
        os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        os.rename(src, dst)
    except OSError as e:
        try:  # the reservation, if still empty (else another process's)
            if dst.is_dir():
                dst.rmdir()
            elif dst.stat().st_size == 0:
                dst.unlink()
        except OSError:
            pass
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # filled by another process meanwhile
            raise FileExistsError(e.errno, e.strerror, str(dst)) from None
        raise


def keep_aside(path: Path) -> Path | None:
    """A second name for the file `path` (None if there is none), from which `os.replace` puts
    it back when replacing `path` fails: a hard link, `path` staying in place; `path` renamed
    where there are no links. Old outputs' names (`remove_leftovers` deletes a killed run's)."""
    if path.is_dir() and not path.is_symlink():  # not a file: replacing it fails anyway
        return None
    old = path.with_name(f".{path.name}.old-{_owner()}")
    try:
        os.link(path, old, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError:  # no hard links here (FAT, some network disks)
        path.rename(old)
    return old


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


@contextmanager
def folder_lock(folder: Path, on_wait: Callable[[], None] | None = None):
    """Hold an exclusive lock on `folder` itself (flock; no file is made in it) while replacing
    files there that go together, such as a .npy and its listing: two runs never mix theirs.
    `on_wait()` is called once if another process holds it. Where the file system cannot lock a
    folder (NFS, a system without flock), nothing is held."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        fd = None
    try:
        if fd is not None and fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait:
                    on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # no locks on this file system
                pass
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


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


# numpy's .npy writer (`tofile`) reports a short write (a full disk) without an errno
_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")


def write_failure(error: OSError) -> str:
    """Why a write failed, for an error message: the system's reason ("No space left on
    device"), or for numpy's short write "N requested and M written", what it means."""
    if error.errno is None and (m := _SHORT_WRITE.search(str(error))):
        return f"only {m[2]} of {m[1]} bytes were written: is the disk full?"
    return _reason(error)


def disk_full(error: OSError) -> bool:
    """Whether a write failed for want of room (or quota), numpy's short write included."""
    short = error.errno is None and _SHORT_WRITE.search(str(error)) is not None
    return short or error.errno in (errno.ENOSPC, errno.EDQUOT)


def write_atomic(path: str | os.PathLike, write, replace: bool = True) -> Path:
    """Write `path` through `write(binary file)` into a temporary file beside it, then move that
    into place: a failure midway leaves the old file, or none, never half of one. Without
    `replace`, a `path` there by then (another process's) is kept: OutputError (`rename_new`)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
        place_file(tmp, path, replace)
    finally:
        tmp.unlink(missing_ok=True)
    return path
