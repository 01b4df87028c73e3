"""The cache of converted models: one MLX model folder per (model, head, dtype, quantization).

Layout under the cache root (AIM_MLX_CACHE, else the user's cache folder + "aim-mlx"):

    models/<name>--<head>--<dtype>[--q<bits>g<group>]/   config.json, safetensors, SHA256SUMS
    .locks/<key>.lock                                     held while that entry is converted

and under the download cache (HF_HUB_CACHE, shared by every AIM_MLX_CACHE that uses it), beside
huggingface_hub's own locks (`hub.readers_folder`):

    .locks/aim-mlx/<name>.lock                            held while <name>'s downloads are removed
    .locks/aim-mlx/<name>/<root id>--<key>.lock           held while <key> is converted from them

Entries appear atomically (the converter writes a temporary folder and renames it), so readers
need no lock; writers take the entry's lock so two processes never convert the same model at once.
An entry written by another converter format version counts as absent and is converted again.

The converter lists the SHA-256 of every file it writes, config.json included, in the entry's
SHA256SUMS (entries written before that file existed: the weights' sizes and SHA-256 in
config.json's "files"); `verify` reads the files again and compares (`aim-mlx cache verify`).
Loading never hashes: it would cost as much as reading the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import sys
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import AimMlxError
from .output import check_writable, dead_leftovers, temp_path

CACHE_ENV = "AIM_MLX_CACHE"


class CacheError(AimMlxError, OSError):
    """The cache cannot be written, or has no such entry."""


def cache_root() -> Path:
    """The cache folder, as an absolute path (a relative AIM_MLX_CACHE is taken from the
    working folder); CacheError if it is a file."""
    root = _default_root()
    if root.exists() and not root.is_dir():
        raise CacheError(f"the model cache {root} is not a folder; set {CACHE_ENV} to a folder")
    return root


def _default_root() -> Path:
    env = os.environ.get(CACHE_ENV, "")
    if env.strip():  # blank: unset, as for the other settings (not a folder " " made here)
        return Path(env).expanduser().absolute()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "aim-mlx"
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home())) / "aim-mlx" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aim-mlx"


def entry_key(name: str, head: str, dtype: str, quantization: dict | None = None) -> str:
    key = f"{name}--{head}--{dtype}"
    if quantization:
        key += f"--q{quantization['bits']}g{quantization['group_size']}"
    return safe_name(key)


def safe_name(name: str) -> str:
    """`name` as a file name: characters other than letters, digits and ._- as _."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def entry_dir(key: str) -> Path:
    return cache_root() / "models" / key


def ensure_writable() -> Path:
    """The cache root, its folders created; CacheError naming AIM_MLX_CACHE if it cannot be
    written."""
    root = cache_root()
    try:
        for folder in (root / "models", root / ".locks"):
            folder.mkdir(parents=True, exist_ok=True)
            check_writable(folder, "cannot write the cache")
    except OSError as e:
        raise CacheError(
            f"cannot write the model cache {root} ({e.strerror or e}); set {CACHE_ENV} to a "
            "writable folder"
        ) from None
    return root


@contextmanager
def lock(key: str, on_wait=None, readers: Path | None = None):
    """Hold the inter-process lock of one entry, waiting as long as it takes; `on_wait()` is
    called once if another process holds it (or, with `readers`, their gate).
    `readers`: the folder of locks (`hub.readers_folder`) of the model whose downloads the holder
    reads; a lock of this holder is made there while no removal of the downloads holds their
    gate, and held too, so that `readers_held` (under any AIM_MLX_CACHE) waits for it."""
    on_wait = _once(on_wait)
    with ExitStack() as stack:
        if readers is not None and (reader := _reader_lock(readers, key, on_wait)):
            stack.enter_context(_held(reader, on_wait))
        stack.enter_context(_held(_lock_file(key), on_wait))
        yield


def _reader_lock(readers: Path, key: str, on_wait) -> Path | None:
    """Entry `key`'s lock file among `readers`, made under their gate; None where the download
    cache cannot be written (nothing can remove the downloads from it then either)."""
    reader = readers / f"{_root_id()}--{key}.lock"
    try:
        readers.mkdir(parents=True, exist_ok=True)
        with _held(_gate(readers), on_wait):
            reader.touch()
    except OSError:
        return None
    return reader


@contextmanager
def readers_held(readers: Path, on_wait=None):
    """Hold the gate of `readers` and every lock in it: wait for the conversions that read a
    model's downloads (`lock`), under every AIM_MLX_CACHE sharing the download cache; one that
    starts meanwhile waits at the gate until this is released. A lock that cannot be opened
    here (a read-only download cache, another account's lock file) is not waited for, as
    `lock` goes on without its own where it cannot make it."""
    waiting = _once(on_wait)  # for whichever lock is held by another process
    with ExitStack() as stack:
        with suppress(OSError):  # a download cache that cannot be written: no reader's lock
            readers.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_held(_gate(readers), waiting))
        for reader in sorted(readers.glob("*.lock")):
            with suppress(OSError):
                stack.enter_context(_held(reader, waiting))
        yield


def _gate(readers: Path) -> Path:
    return readers.parent / f"{readers.name}.lock"


def _root_id() -> str:
    """A short name for this cache root, unique among those sharing a download cache."""
    return hashlib.sha256(os.fsencode(cache_root())).hexdigest()[:12]


def _lock_file(key: str) -> Path:
    """Entry `key`'s lock file, in the cache made writable (CacheError where it cannot be)."""
    return ensure_writable() / ".locks" / f"{key}.lock"


def _once(on_wait):
    """`on_wait` that does something the first time only (one "waiting" line per wait)."""
    calls = []

    def once():
        if on_wait and not calls:
            calls.append(True)
            on_wait()

    return once


@contextmanager
def _held(path: Path, on_wait=None):
    """Hold the file lock `path`; `on_wait()` is called once if another process holds it."""
    file_lock = FileLock(path)
    try:
        file_lock.acquire(timeout=0)
    except Timeout:
        if on_wait:
            on_wait()
        file_lock.acquire()
    try:
        yield
    finally:
        file_lock.release()


def has_weights(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (
        folder / "model.safetensors.index.json"
    ).is_file()


def is_current(folder: Path, files=(), settings: dict | None = None) -> bool:
    """A complete entry written by this converter format version; with `files` (registry
    HubFiles) and `settings` (config values such as the probe layers), also converted from
    exactly those files (name and SHA-256 prefix) with those settings: an entry made before
    its registry entry changed is converted again, not served as the new model."""
    from .convert import FORMAT_VERSION

    config = _config_or_none(folder)
    if not config or config.get("format_version") != FORMAT_VERSION or not has_weights(folder):
        return False
    if any(config.get(k) != v for k, v in (settings or {}).items()):
        return False
    try:
        made_from = [(s["file"], s["sha256"]) for s in config.get("sources") or []]
    except (KeyError, TypeError):  # a damaged record: convert again
        return False
    return all(
        any(
            name == Path(f.filename).name and str(sha).startswith(f.sha256)
            for name, sha in made_from
        )
        for f in files
    )


def made_by_newer(folder: Path) -> int | None:
    """The format version of an entry that a newer aim-mlx wrote, else None: this one must
    neither serve nor replace it (two versions sharing a cache would convert it back and forth)."""
    return _newer_version(_config_or_none(folder))


def _newer_version(config: dict | None) -> int | None:
    from .convert import FORMAT_VERSION

    version = (config or {}).get("format_version")
    return version if type(version) is int and version > FORMAT_VERSION else None


def _config_or_none(folder: Path) -> dict | None:
    """An entry's config, or None for a missing or damaged one (converted again on use)."""
    from .loader import ModelLoadError, read_config

    try:
        return read_config(folder)
    except ModelLoadError:
        return None


def file_size(path: Path) -> int | None:
    """The size of a file; None for anything else, or for a file that another process removed
    since it was listed (a listing while a conversion or an extraction runs)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def folder_size(folder: Path) -> int:
    """Bytes of the files under `folder`; what another process removes meanwhile counts 0."""
    return sum(file_size(Path(top, n)) or 0 for top, _, names in os.walk(folder) for n in names)


@dataclass
class Entry:
    key: str
    path: Path
    size: int
    config: dict | None
    current: bool  # False: converted again on next use (another format, or its model changed)

    @property
    def newer(self) -> bool:
        """Made by a newer aim-mlx: neither served nor replaced by this one."""
        return _newer_version(self.config) is not None

    def row(self) -> dict:
        """The entry as `cache list --json` and `models --json` show it."""
        return dict(
            key=self.key,
            path=str(self.path),
            size=self.size,
            current=self.current,
            newer=self.newer,
        )


def list_entries() -> list[Entry]:
    from . import registry

    models = cache_root() / "models"
    if not models.is_dir():
        return []
    try:  # by lowercase name, as registry.get finds them
        specs = {name.lower(): spec for name, spec in registry.all_models().items()}
    except registry.RegistryError:  # an unreadable AIM_MLX_REGISTRY: the format alone
        specs = {}
    entries = []
    for path in sorted(p for p in models.iterdir() if p.is_dir() and not p.name.startswith(".")):
        config = _config_or_none(path)
        current = is_current(path, **_expected(path.name, config, specs))
        entries.append(Entry(path.name, path, folder_size(path), config, current))
    return entries


def _expected(key: str, config: dict | None, specs: dict) -> dict:
    """What the entry `key` of a registered model (in `specs`) must have been made from, as
    the registry now has it (`is_current`'s files and settings); {} for other entries."""
    name = (config or {}).get("name")
    spec = specs.get(name.lower()) if isinstance(name, str) else None
    if spec is None:
        return {}
    prefix = safe_name(spec.name).lower() + "--"  # a checkpoint folder's entry: "local-..."
    head = key[len(prefix) :].split("--")[0] if key.lower().startswith(prefix) else None
    if head not in spec.heads:
        return {}
    return dict(files=spec.files(head), settings=spec.cache_settings(head))


def remove(key: str, on_wait=None) -> int:
    """Delete one entry (under its lock; `on_wait()` if another process holds it); bytes freed.
    An entry that is a link (to a folder elsewhere) is unlinked, its target kept: 0 bytes."""
    path = entry_dir(key)
    if not path.is_dir():
        raise CacheError(f"no cache entry {key!r} in {cache_root() / 'models'}")
    with lock(key, on_wait):
        if path.is_symlink():  # an entry moved to another disk: the link goes, never its target
            try:
                path.unlink()
            except OSError as e:
                raise CacheError(f"cannot remove {path}: {e.strerror} ({CACHE_ENV})") from None
            return 0
        size = folder_size(path)
        doomed = temp_path(path)  # out of the cache at once: an interrupted removal leaves a
        try:  # hidden leftover (`remove_leftovers`), not a damaged entry
            path.rename(doomed)
            shutil.rmtree(doomed)
        except OSError as e:
            raise CacheError(f"cannot remove {path}: {e.strerror or e} ({CACHE_ENV})") from None
    return size


def entries_named(names: Iterable[str], entries: list[str] | None = None) -> list[str]:
    """The keys, sorted, of the entries (of `entries`, else the cache's) that `names` pick: an
    entry's key (in any case) picks that entry, a model name (aim-1B) every entry of the model.
    Every name is checked first: CacheError for one that picks nothing."""
    entries = [e.key for e in list_entries()] if entries is None else entries
    chosen = set()
    for name in names:
        if not (matches := _entries_of(name, entries)):
            raise CacheError(f"nothing cached under {name!r}; see `aim-mlx cache list`")
        chosen |= matches
    return sorted(chosen)


def _entries_of(name: str, entries: list[str]) -> set[str]:
    prefix = name.lower() + "--"  # an entry's key names that one entry, not its -q ones
    return {key for key in entries if key.lower() == name.lower()} or {
        key for key in entries if key.lower().startswith(prefix)
    }


def to_remove(names: Iterable[str] = (), remove_all: bool = False) -> tuple[list, list]:
    """What `aim-mlx cache rm` removes: the keys of the model entries and of the feature sets
    that `names` pick (a feature set by its key; see `entries_named`), or all of both; the names
    are checked before anything is removed, with `remove_all` too."""
    names = list(names)
    entries = [e.key for e in list_entries()]
    feature_sets = sorted(e.key for e in list_feature_sets())
    models = entries_named([n for n in names if n not in feature_sets], entries)  # --all too
    if remove_all:
        return entries, feature_sets
    return models, [key for key in feature_sets if key in names]


def verify_named(
    names: Iterable[str | os.PathLike] = (), progress: bool = False
) -> Iterator[Verdict]:
    """`verify` the entries that `names` pick (`entries_named`) and `verify_folder` the converted
    folders they name (`aim-mlx convert -o`), else every entry: one Verdict at a time. The names
    are checked before the first: CacheError for one that picks nothing or is a feature set."""
    from .resolve import is_converted

    names = [os.fspath(n) for n in names]  # a folder may be a Path
    entries = [e.key for e in list_entries()]
    features = {e.key for e in list_feature_sets()}
    folders = [n for n in names if not _entries_of(n, entries) and is_converted(Path(n))]
    if feature_set := next((n for n in names if n in features and n not in entries), None):
        raise CacheError(
            f"{feature_set!r} is a feature set (probe train's cache); verify checks models"
        )
    keys = entries_named([n for n in names if n not in folders], entries) if names else entries
    return _verdicts(keys, folders, progress)


def _verdicts(keys: list[str], folders: list[str], progress: bool) -> Iterator[Verdict]:
    for key in keys:
        yield verify(key, progress)
    for folder in folders:
        yield verify_folder(folder, progress)


@dataclass
class Verdict:
    """What `verify` found in one entry. `status`: ok; damaged (a file differs from its record,
    or the record cannot be read); missing (recorded files, or SHA256SUMS, are gone);
    no-checksums (none recorded: made by an older aim-mlx); newer (made by a newer aim-mlx: not
    checked); busy (another process converts or removes it now); removed (not in the cache, or
    removed meanwhile). `problems`: file name -> what is wrong with it."""

    key: str
    path: Path
    status: str
    problems: dict[str, str]
    in_cache: bool = True  # False: a converted folder elsewhere (`verify_folder`)

    @property
    def failed(self) -> bool:
        """Damaged or missing a file: the next use would compute with wrong weights, or fail."""
        return self.status in ("damaged", "missing")

    def row(self) -> dict:
        """The verdict as `cache verify --json` prints it."""
        return dict(key=self.key, path=str(self.path), status=self.status, problems=self.problems)


def verify(key: str, progress: bool = False) -> Verdict:
    """Hash the files of entry `key` again and compare them with the sizes and SHA-256 recorded
    at conversion. Runs under the entry's lock, so that no conversion or removal changes it
    meanwhile; one that holds the lock now makes the verdict "busy" (it does not wait). A cache
    that cannot be written (no lock file can be made) is read without the lock."""
    path = entry_dir(key)
    removed = Verdict(key, path, "removed", {})
    if not path.is_dir():
        return removed
    with _held_unless_busy(key) as free:
        if not free:
            return Verdict(key, path, "busy", {})
        verdict = _verify_files(key, path, progress)
    return verdict if path.is_dir() else removed  # gone meanwhile (`rm -r`, or no lock held)


def verify_folder(path: str | Path, progress: bool = False) -> Verdict:
    """`verify` for a converted folder outside the cache (`aim-mlx convert -o`): no lock."""
    path = Path(path)
    verdict = _verify_files(str(path), path, progress)
    verdict.in_cache = False
    return verdict


@contextmanager
def _held_unless_busy(key: str):
    """Yield True holding entry `key`'s lock, False if another process holds it; True without
    the lock where the cache cannot be written."""
    try:
        path = _lock_file(key)
    except CacheError:
        yield True
        return
    file_lock = FileLock(path)
    try:
        file_lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        file_lock.release()


def _verify_files(key: str, path: Path, progress: bool) -> Verdict:
    from .convert.converter import SUMS_FILE
    from .loader import ModelLoadError, read_config

    try:
        config = read_config(path)
    except ModelLoadError as e:
        return Verdict(key, path, "damaged", {"config.json": str(e)})
    if _newer_version(config) is not None:
        return Verdict(key, path, "newer", {})
    if "checksums" in config or (path / SUMS_FILE).exists():
        records, problems = _sums_records(path)
    elif "files" in config:  # written before SHA256SUMS: the weights only, in config.json
        records, problems = _file_records(config["files"]), {}
        if records is None:
            problems = {"config.json": "its record of files is malformed"}
    else:
        return Verdict(key, path, "no-checksums", {})
    if not problems:
        problems = _check_files(path, records, progress, desc=f"verifying {key}")
    missing = problems and all(p == "missing" for p in problems.values())
    return Verdict(key, path, "missing" if missing else "damaged" if problems else "ok", problems)


SUMS_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")  # as sha256sum writes it (text or binary)


def _sums_records(folder: Path) -> tuple[list, dict[str, str]]:
    """SHA256SUMS as (name, None, sha256) records, and {SHA256SUMS: what is wrong} if it is
    missing, unreadable, malformed (a name that is not a file of the folder included) or
    leaves out config.json or a weight file."""
    from .convert.converter import SUMS_FILE

    try:
        data = (folder / SUMS_FILE).read_bytes()
    except FileNotFoundError:
        return [], {SUMS_FILE: "missing"}
    except OSError as e:
        return [], {SUMS_FILE: f"cannot be read ({e.strerror or e})"}
    rows = [SUMS_LINE.fullmatch(line) for line in data.decode(errors="replace").splitlines()]
    if not rows or not all(rows) or not all(_is_file_name(m[2]) for m in rows):
        return [], {SUMS_FILE: "malformed: expected lines of a SHA-256 and a file name"}
    listed = {m[2] for m in rows}
    weights = [p.name for p in folder.glob("model*.safetensors*") if p.name not in listed]
    if unlisted := sorted({"config.json"} - listed) + sorted(weights):
        return [], {SUMS_FILE: f"does not list {', '.join(unlisted)}"}
    return [(m[2], None, m[1]) for m in rows], {}


def _file_records(files) -> list[tuple[str, int, str]] | None:
    """config.json's "files" as (name, size, sha256); None if malformed (a name that is not a
    file of the folder included)."""
    try:
        records = [(f["file"], f["size"], f["sha256"]) for f in files]
    except (KeyError, TypeError):
        return None
    well_formed = all(
        isinstance(name, str) and _is_file_name(name) and type(size) is int
        and isinstance(sha, str)
        for name, size, sha in records
    )  # fmt: skip
    return records if records and well_formed else None


def _is_file_name(name: str) -> bool:
    """A file of the folder itself: never a path elsewhere."""
    return Path(name).name == name and name not in ("", ".", "..")


def _check_files(folder: Path, records, progress: bool, desc: str) -> dict[str, str]:
    """file name -> what differs from its record (missing, its size, its SHA-256, unreadable),
    for the files that differ. `records`: (name, size or None: not recorded, sha256)."""
    from tqdm import tqdm

    from .convert.checkpoint import sha256_of  # read afresh: never the memo of file_sha256

    problems = {}
    total = sum(file_size(folder / name) or 0 for name, _, _ in records)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=desc,
        leave=False,
        disable=not progress or None,  # None: only on a terminal
        file=sys.stderr,
    ) as bar:
        for name, size, sha in records:
            file = folder / name
            if (found := file_size(file)) is None:
                problems[name] = "missing"
            elif size is not None and found != size:
                problems[name] = f"{found} bytes, {size} when converted"
            else:
                try:
                    if sha256_of(file, bar.update) != sha:
                        problems[name] = "its SHA-256 differs from the one recorded when converted"
                except FileNotFoundError:
                    problems[name] = "missing"
                except OSError as e:  # an I/O error: the disk fault a checksum is there for
                    problems[name] = f"cannot be read ({e.strerror or e})"
    return problems


def remove_leftovers() -> int:
    """Delete what killed conversions and removals left in the cache (hidden folders of
    processes that are gone); bytes freed."""
    freed = 0
    for path, _ in dead_leftovers(cache_root() / "models"):
        if path.is_dir() and not path.is_symlink():
            freed += folder_size(path)
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return freed


# ---- cached features of trained heads (aim_mlx.probe.features): features/<set key>/ ----------


def features_root() -> Path:
    return cache_root() / "features"


@dataclass
class FeatureSetEntry:
    key: str
    path: Path
    size: int
    images: int
    info: dict | None


def list_feature_sets() -> list[FeatureSetEntry]:
    root = features_root()
    if not root.is_dir():
        return []
    entries = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            sizes = {p: size for p in path.iterdir() if (size := file_size(p)) is not None}
        except FileNotFoundError:  # removed by another process meanwhile
            continue
        images = sum(1 for p in sizes if p.suffix == ".npy" and not p.name.startswith("."))
        info = _read_json(path / "info.json")
        entries.append(FeatureSetEntry(path.name, path, sum(sizes.values()), images, info))
    return entries


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # not UTF-8, not JSON, nested too deep
        return None


def remove_feature_set(key: str) -> int:
    """Delete one feature set; bytes freed."""
    path = features_root() / key
    if not path.is_dir():
        raise FileNotFoundError(f"no feature set {key!r} in {features_root()}")
    size = folder_size(path)
    shutil.rmtree(path)
    return size
