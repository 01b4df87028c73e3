"""Download a registered model's checkpoints from the Hugging Face hub and check them.

huggingface_hub does the downloading: its cache (HF_HOME / HF_HUB_CACHE), progress bars, retries
and resumption, HF_ENDPOINT and HF_HUB_OFFLINE. On top of it: a free-space check before anything
is fetched, and the SHA-256 of every file against the prefix the registry publishes.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .constants import GB
from .convert.checkpoint import file_sha256
from .errors import AimMlxError
from .output import check_writable
from .process_wide import ProcessWide
from .registry import HubFile, ModelSpec, estimated_sizes

NO_NETWORK_HINT = (
    "If the files are already in the download cache, set HF_HUB_OFFLINE=1 to use them without "
    "asking the hub; otherwise run `aim-mlx cache add MODEL` on a connected machine and copy "
    "its cache (HF_HOME, AIM_MLX_CACHE), or pass a local folder of checkpoints or a converted "
    "model as the model."
)


class HubError(AimMlxError, RuntimeError):
    """A download that could not be done (network, offline mode, disk space, checksum)."""


class ChecksumError(HubError):
    pass


class DiskSpaceError(HubError):
    pass


@dataclass
class PlannedFile:
    file: HubFile
    local: Path | None  # already in the download cache
    size: int  # bytes (estimated when neither the registry nor the hub says)


def check_endpoint() -> None:
    """HubError unless HF_ENDPOINT, if set, is an http(s) address: huggingface_hub failed to
    import with a ValueError for a port out of range, and retried a URL without http:// as if
    the network had failed."""
    value = os.environ.get("HF_ENDPOINT")  # set but empty: huggingface_hub takes "" as is
    try:
        parts = urlsplit("https://huggingface.co" if value is None else value)
        good = parts.scheme in ("http", "https") and parts.hostname and parts.port != 0
    except ValueError:  # a port out of range or not a number
        good = False
    if not good:
        raise HubError(
            f"HF_ENDPOINT must be the hub's address, like https://huggingface.co, got {value!r}"
        )


def cached_path(spec: ModelSpec, file: HubFile, cache_dir: str | Path | None = None) -> Path | None:
    """The file in huggingface_hub's cache, or None; no network."""
    check_endpoint()  # before huggingface_hub is imported
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        spec.repo, file.filename, cache_dir=cache_dir, revision=spec.revision
    )
    return Path(found) if isinstance(found, str) else None


def plan(spec: ModelSpec, head: str, cache_dir=None, endpoint=None) -> list[PlannedFile]:
    """What downloading this model's files involves: which are cached, how big each is."""
    estimates = dict(zip(spec.files(head), estimated_sizes(spec), strict=True))
    planned = []
    for file in spec.files(head):
        local = cached_path(spec, file, cache_dir)
        # the hub is asked even where the registry gives the size: a missing file is found now
        size = local.stat().st_size if local else remote_size(spec, file, endpoint) or file.size
        planned.append(PlannedFile(file, local, size or estimates[file]))
    return planned


def remote_size(spec: ModelSpec, file: HubFile, endpoint=None) -> int | None:
    """The size the hub reports for a file, or None when it cannot be asked (offline). A file
    the hub says it does not have, or will not give (HTTP 401, 403, 404), or a hub that cannot
    be reached or does not answer, is a HubError here, before any file is fetched (not after a
    backbone of many GB; huggingface_hub asks a hub that does not answer again for minutes)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    if constants.HF_HUB_OFFLINE:
        return None
    url = hf_hub_url(spec.repo, file.filename, revision=spec.revision, endpoint=endpoint)
    try:
        return get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT).size
    except Exception as e:  # other problems: the download that follows reports them
        where = f"{file.filename} from {spec.repo}"
        if (status := _http_status(e)) in (401, 403, 404):
            raise HubError(_http_error(where, status, endpoint, e)) from None
        if _is_connection_error(e, no_answer=True):
            raise HubError(_unreachable(where, e, endpoint)) from None
        return None


def download(
    spec: ModelSpec,
    head: str,
    *,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    also_needed: dict[Path, int] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Fetch the backbone and the chosen head (unless cached), verify them, return their paths.

    `also_needed` adds other space requirements ({folder: bytes}, e.g. the converted model) to
    the free-space check made before the first byte is fetched.
    """
    check_endpoint()
    from huggingface_hub import constants

    hub_dir = Path(cache_dir or constants.HF_HUB_CACHE)
    files = spec.files(head)
    if not constants.HF_HUB_OFFLINE and any(cached_path(spec, f, cache_dir) is None for f in files):
        check_download_cache(hub_dir)
    planned = plan(spec, head, cache_dir, endpoint)  # an unreachable hub ends here, once
    missing = [p for p in planned if p.local is None]
    names = ", ".join(p.file.filename for p in missing)
    if missing and constants.HF_HUB_OFFLINE:
        raise HubError(
            f"{spec.name} needs {names} from {spec.repo}, not downloaded yet, and HF_HUB_OFFLINE "
            "is set: run once with network access (or `aim-mlx cache add` on a connected machine "
            "and copy its cache), or pass a local folder as the model."
        )
    needs = dict(also_needed or {})
    if missing:
        needs[hub_dir] = needs.get(hub_dir, 0) + sum(p.size for p in missing)
    check_disk_space(needs, what=f"{spec.name} ({head} head)")
    if missing and progress:
        total = sum(p.size for p in missing)
        print(f"downloading {names} ({human(total)}) from {spec.repo}", file=sys.stderr)
    return [_verified(spec, p, cache_dir, endpoint, progress) for p in planned]


def _verified(spec: ModelSpec, p: PlannedFile, cache_dir, endpoint, progress: bool) -> Path:
    """`download`'s path of a planned file, verified: its cached copy, else (or, unless offline,
    when that copy does not match) one fetched now."""
    from huggingface_hub import constants

    with hub_bars(progress):
        path = p.local or fetch(spec, p.file, cache_dir=cache_dir, endpoint=endpoint)
    try:
        verify(spec, p.file, path, progress=progress)
    except ChecksumError:
        if not p.local or constants.HF_HUB_OFFLINE:
            raise
        # another version (its registry entry changed since) or damaged: fetched afresh
        if progress:
            print(f"{p.file.filename}: the cached copy does not match; downloading it again",
                  file=sys.stderr)  # fmt: skip
        with hub_bars(progress):
            path = fetch(spec, p.file, cache_dir=cache_dir, endpoint=endpoint)
        verify(spec, p.file, path, progress=progress, again=True)
    return path


def _bars_off() -> bool:
    """Whether this turned huggingface_hub's bars off (False: they were off already)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

    if are_progress_bars_disabled():
        return False
    disable_progress_bars()
    return True


def _bars_back(turned_off: bool) -> None:
    from huggingface_hub.utils import enable_progress_bars

    if turned_off:
        enable_progress_bars()


_HUB_BARS_OFF = ProcessWide(_bars_off, _bars_back)


def hub_bars(progress: bool):
    """huggingface_hub's own progress bars, in the block, as aim-mlx shows its bars: only on a
    terminal, never with --no-progress (it shows them whatever was asked). Bars a user turned
    off stay off; HF_HUB_DISABLE_PROGRESS_BARS=0 keeps them on; with blocks in several threads,
    they come back on when the last block ends (`ProcessWide`)."""
    from huggingface_hub import constants

    terminal = sys.stderr is not None and sys.stderr.isatty()
    if (progress and terminal) or constants.HF_HUB_DISABLE_PROGRESS_BARS is False:
        return nullcontext()
    return _HUB_BARS_OFF.held()


def check_download_cache(hub_dir: Path) -> None:
    """HubError naming HF_HOME unless downloads can be written into `hub_dir`."""
    try:
        hub_dir.mkdir(parents=True, exist_ok=True)
        check_writable(hub_dir, "cannot write the download cache")
    except OSError as e:
        raise HubError(
            f"cannot write the download cache {hub_dir} ({e.strerror or e}); set HF_HOME (or "
            "HF_HUB_CACHE) to a writable folder"
        ) from None


def _unreachable(where: str, error: BaseException, endpoint: str | None) -> str:
    """The hub cannot be reached, or did not answer a request about `where` in time."""
    from huggingface_hub import constants

    hub = f"the hub ({_endpoint(endpoint)}){_through_proxy(endpoint)}"
    if _stalled(error):
        wait = constants.HF_HUB_ETAG_TIMEOUT
        return (
            f"{hub} did not answer about {where} within {wait} s (HF_HUB_ETAG_TIMEOUT sets the "
            f"wait): try again later, or check the network or proxy. {NO_NETWORK_HINT}"
        )
    return f"cannot reach {hub} for {where} ({error}). {NO_NETWORK_HINT}"


def _through_proxy(endpoint: str | None) -> str:
    """' through the proxy P (...)' where the environment (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY,
    less NO_PROXY) sends requests to the hub through one: a proxy that is down refuses the
    connection as if the hub did."""
    import urllib.request

    parts = urlsplit(_endpoint(endpoint))
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass_environment(parts.hostname or "", proxies):
        return ""
    variable = f"{parts.scheme.upper()}_PROXY" if parts.scheme in proxies else "ALL_PROXY"
    return f" through the proxy {proxy} ({variable})"


def _is_connection_error(error: BaseException | None, no_answer: bool = False) -> bool:
    """A failure to connect or to resolve the host name, in any HTTP client's exception types;
    with `no_answer`, also a server that accepted the connection but did not answer in time."""
    kinds = {"ConnectError", "ConnectTimeout", "ConnectionError", "NameResolutionError"}
    if no_answer:
        kinds |= {"ReadTimeout", "TimeoutException"}
    return _in_chain(error, kinds)


def _stalled(error: BaseException | None) -> bool:
    """A read that waited longer than HF_HUB_DOWNLOAD_TIMEOUT for data (httpx's or requests'
    ReadTimeout, urllib3's ReadTimeoutError), anywhere in the exception's chain."""
    return _in_chain(error, {"ReadTimeout", "ReadTimeoutError"})


def _dropped(error: BaseException | None) -> bool:
    """A connection made, then reset or broken midway (httpx's ReadError, an OS
    ConnectionResetError): huggingface_hub (2.x) does not resume it, another attempt can."""
    kinds = {"ReadError", "ConnectionResetError", "ConnectionAbortedError", "BrokenPipeError"}
    return _in_chain(error, kinds)


def _in_chain(error: BaseException | None, kinds: set[str]) -> bool:
    """Whether an exception, or one it was raised from, is of a class named in `kinds`."""
    while error is not None:
        if {cls.__name__ for cls in type(error).__mro__} & kinds:
            return True
        error = error.__cause__ or error.__context__
    return False


def _stall_error(where: str, endpoint: str | None) -> str:
    from huggingface_hub import constants

    wait = getattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 10)
    return (
        f"downloading {where} failed: the hub ({_endpoint(endpoint)}) stopped sending, no data "
        f"for {wait} s on each of huggingface_hub's tries (it resumes while data comes). Try "
        "again later, or check the network or proxy; HF_HUB_DOWNLOAD_TIMEOUT sets how many "
        "seconds each try waits for data."
    )


ATTEMPTS = 3


def fetch(spec: ModelSpec, file: HubFile, *, cache_dir=None, endpoint=None) -> Path:
    """hf_hub_download, tried again after a transient failure (huggingface_hub resumes or
    restarts the file, depending on its version); failures become HubError messages.

    A read timeout is not tried again: huggingface_hub already tries again itself, resuming,
    for as long as data comes, and gives up only after several tries in a row got none (a
    stalled server); another attempt here would only multiply that wait. A connection reset
    midway is tried again (huggingface_hub 2.x restarts the file then).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    from . import __version__

    where = f"{file.filename} from {spec.repo}"
    attempt = 1
    while True:
        try:
            return Path(
                hf_hub_download(
                    spec.repo,
                    file.filename,
                    revision=spec.revision,
                    cache_dir=cache_dir,
                    endpoint=endpoint,
                    library_name="aim-mlx",
                    library_version=__version__,
                )
            )
        except LocalEntryNotFoundError as e:
            if status := _http_status(e):  # the server answered, with an error
                raise HubError(_http_error(where, status, endpoint, e)) from None
            raise HubError(
                f"{where} is not downloaded yet and the hub cannot be reached: {e} "
                f"{NO_NETWORK_HINT}"
            ) from None
        except Exception as e:  # network and HTTP errors of huggingface_hub and its HTTP client
            if message := _final_failure(e, where, endpoint):
                raise HubError(message) from None
            reason = _first_line(e)
            if _is_permanent(e) or attempt == ATTEMPTS:
                raise HubError(f"downloading {where} failed: {reason}") from e
            attempt += 1
            print(f"{where}: {reason}; trying again ({attempt}/{ATTEMPTS})", file=sys.stderr)
            time.sleep(attempt - 1)


def _final_failure(error: Exception, where: str, endpoint: str | None) -> str | None:
    """The message of a failed download of `where` that `fetch` reports at once, in its own
    words (a stalled hub, no connection, a header that is not ASCII, HTTP 401, 403 or 404);
    None for the others."""
    if _stalled(error):
        return _stall_error(where, endpoint)
    if _is_connection_error(error) and not _dropped(error):
        return f"downloading {where} failed: {error}. {NO_NETWORK_HINT}"
    if isinstance(error, UnicodeEncodeError):
        return (
            f"downloading {where} failed: a request header holds a character that is not "
            "ASCII; check HF_TOKEN (and any other HF_* setting)"
        )
    if (status := _http_status(error)) in (401, 403, 404):  # one line, not the hub's text
        return _http_error(where, status, endpoint, error)
    return None


def _first_line(error: BaseException) -> str:
    """An error's first line: huggingface_hub's go on with advice for its Python API ("Please
    retry with `force_download=True`") or the hub's paragraphs."""
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _http_status(error: BaseException | None) -> int | None:
    """The HTTP status of the first response in an exception's chain, if any."""
    while error is not None:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status:
            return status
        error = error.__cause__ or error.__context__
    return None


def _http_error(where: str, status: int, endpoint: str | None, error=None) -> str:
    hints = {
        401: "Check HF_TOKEN (`hf auth login`) and that your account may read the repo.",
        404: "Check HF_ENDPOINT (a mirror may lack the file) and the model's repo, revision and "
        "file names (AIM_MLX_REGISTRY).",
    }
    hint = hints.get(401 if status == 403 else status, "Check HF_ENDPOINT, or try again later.")
    if _in_chain(error, {"GatedRepoError"}):  # the hub's X-Error-Code: GatedRepo
        hint = (
            "The repo is gated: accept its conditions on its page on the hub, signed in with "
            "the account whose token HF_TOKEN holds (`hf auth login`)."
        )
    answer = f"the hub ({_endpoint(endpoint)}) answered HTTP {status}"
    return f"downloading {where} failed: {answer}. {hint}"


def _endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return endpoint or constants.ENDPOINT


def _is_permanent(error: Exception) -> bool:
    """Errors that another attempt cannot fix: missing repo, file or revision, no access, a
    full disk."""
    from huggingface_hub import utils

    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True

    missing = (
        utils.EntryNotFoundError,
        utils.RepositoryNotFoundError,
        utils.RevisionNotFoundError,
        utils.GatedRepoError,
        utils.OfflineModeIsEnabled,
    )
    if isinstance(error, missing):
        return True
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None) or 0
    return 400 <= status < 500 and status not in (408, 429)


def verify(
    spec: ModelSpec, file: HubFile, path: Path, progress: bool = True, again: bool = False
) -> None:
    """Refuse a file whose SHA-256 does not start with the registry's prefix.

    A file that fails is removed from the download cache, so the next run fetches it afresh.
    `again`: the file was just downloaded afresh after a cached copy failed.
    """
    try:
        digest = file_sha256(path, progress=progress and sys.stderr.isatty())  # bar: terminals only
    except FileNotFoundError:  # removed by a process that takes no lock of aim-mlx
        raise HubError(
            f"{file.filename} from {spec.repo} was removed from the download cache meanwhile, "
            "by another process (`hf cache rm`, or an older aim-mlx's `cache rm-downloads`); "
            "run the command again to download it afresh"
        ) from None
    if digest.startswith(file.sha256):
        return
    from huggingface_hub import constants

    remove_cached_file(path)
    online = "" if not constants.HF_HUB_OFFLINE else ", online (HF_HUB_OFFLINE is set),"
    mismatch = (
        f"checksum mismatch for {file.filename} from {spec.repo}: its SHA-256 is {digest[:16]}..., "
        f"expected {file.sha256}... The file was removed from the download cache"
    )
    if again:  # the cached copy failed too: twice is not a damaged transfer
        raise ChecksumError(
            f"{mismatch}; downloaded afresh, it differs again: the file on the hub is not the one "
            "aim-mlx knows (check AIM_MLX_REGISTRY's sha256 and revision): do not use it."
        )
    raise ChecksumError(
        f"{mismatch}; run the command again{online} to download it afresh. If this repeats, the "
        "file on the hub is not the one aim-mlx knows: do not use it."
    )


def remove_cached_file(path: Path) -> int:
    """Delete a file from huggingface_hub's cache (the blob and its snapshot link); bytes freed.
    HubError where it cannot be deleted (a read-only cache, another account's files)."""
    blob = path.resolve()
    size = blob.stat().st_size if blob.exists() else 0
    for p in {blob, path}:
        try:
            if p.is_symlink() or p.exists():
                p.unlink()
        except OSError as e:
            raise HubError(
                f"cannot remove {p} from the download cache ({e.strerror or e}); check that "
                "you may write there (HF_HOME / HF_HUB_CACHE)"
            ) from None
    return size


def downloaded(spec: ModelSpec, cache_dir=None) -> list[tuple[HubFile, Path]]:
    """The model's files that are in the download cache."""
    files = [spec.backbone, *spec.heads.values()]
    return [(f, path) for f in files if (path := cached_path(spec, f, cache_dir))]


def readers_folder(name: str, cache_dir=None) -> Path:
    """The folder of the locks that conversions reading model `name`'s downloads hold
    (`cache.lock`) and that removing them waits for (`cache.readers_held`): beside
    huggingface_hub's own locks in the download cache, so that every AIM_MLX_CACHE sharing that
    cache sees them."""
    check_endpoint()
    from huggingface_hub import constants

    from .cache import safe_name

    return Path(cache_dir or constants.HF_HUB_CACHE) / ".locks" / "aim-mlx" / safe_name(name)


def remove_downloads(spec: ModelSpec, cache_dir=None, progress: bool = True) -> int:
    """Drop a model's raw checkpoints from the download cache, and the partial files of
    interrupted downloads of its repo; bytes freed. Downloads and conversions of the model in
    other processes (which read those files) are waited for."""
    from . import cache

    def say_waiting():
        if progress:
            print(f"waiting for another process converting {spec.name}", file=sys.stderr)

    readers = readers_folder(spec.name, cache_dir)
    if not readers.parents[2].is_dir():  # no download cache: nothing to remove, none made
        return 0
    with cache.readers_held(readers, on_wait=say_waiting):
        freed = sum(remove_cached_file(path) for _, path in downloaded(spec, cache_dir))
        for partial in stale_partials(spec, cache_dir):
            freed += partial.stat().st_size
            partial.unlink(missing_ok=True)
    return freed


# A partial download not written to for this long belongs to a process that was killed.
STALE_AFTER_S = 120


def stale_partials(spec: ModelSpec, cache_dir=None) -> list[Path]:
    """`*.incomplete` files of the repo's killed downloads: huggingface_hub (2.x) gives each
    download its own temporary name and does not resume it in the next process, so a killed
    download leaves one behind."""
    from huggingface_hub import constants

    root = Path(cache_dir or constants.HF_HUB_CACHE)
    blobs = root / f"models--{spec.repo.replace('/', '--')}" / "blobs"
    now = time.time()
    return sorted(p for p in blobs.glob("*.incomplete") if now - p.stat().st_mtime > STALE_AFTER_S)


def free_bytes(folder: Path) -> tuple[Path, int]:
    """(the nearest existing ancestor, its free bytes)."""
    folder = Path(folder).expanduser().absolute()
    while not folder.exists():
        folder = folder.parent
    return folder, shutil.disk_usage(folder).free


def human(nbytes: int) -> str:
    """Bytes in GB, or in MB below 0.1 GB (small models would read "0.00 GB")."""
    return f"{nbytes / GB:.2f} GB" if nbytes >= GB / 10 else f"{nbytes / 1e6:.1f} MB"


def check_disk_space(needs: dict[Path, int], what: str = "the model") -> None:
    """Raise DiskSpaceError unless every file system has room for what goes on it."""
    per_device: dict[int, list] = {}
    for folder, nbytes in needs.items():
        existing, free = free_bytes(folder)
        entry = per_device.setdefault(os.stat(existing).st_dev, [0, free, []])
        entry[0] += nbytes
        entry[2].append(f"{human(nbytes)} in {folder}")
    for total, free, parts in per_device.values():
        if total > free:
            raise DiskSpaceError(
                f"not enough free disk space for {what}: it needs about {human(total)} "
                f"({', '.join(parts)}) but only {human(free)} is free there. Free some "
                "space, or point HF_HOME (downloads) and AIM_MLX_CACHE (converted models) "
                "to a larger disk."
            )
