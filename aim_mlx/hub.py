"""Download a registered model's checkpoints from the Hugging Face hub and check them.

huggingface_hub does the downloading: its cache (HF_HOME / HF_HUB_CACHE), progress bars, retries
and resumption, HF_ENDPOINT and HF_HUB_OFFLINE. On top of it: a free-space check before anything
is fetched, and the SHA-256 of every file against the prefix the registry publishes.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .constants import GB
from .convert.checkpoint import file_sha256
from .errors import AimMlxError
from .output import check_writable
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


def cached_path(spec: ModelSpec, file: HubFile, cache_dir: str | Path | None = None) -> Path | None:
    """The file in huggingface_hub's cache, or None; no network."""
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
        size = local.stat().st_size if local else file.size or remote_size(spec, file, endpoint)
        planned.append(PlannedFile(file, local, size or estimates[file]))
    return planned


def remote_size(spec: ModelSpec, file: HubFile, endpoint=None) -> int | None:
    """The size the hub reports for a file, or None when it cannot be asked (offline)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    if constants.HF_HUB_OFFLINE:
        return None
    url = hf_hub_url(spec.repo, file.filename, revision=spec.revision, endpoint=endpoint)
    try:
        return get_hf_file_metadata(url).size
    except Exception:  # the download that follows reports the real problem
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
    from huggingface_hub import constants

    planned = plan(spec, head, cache_dir, endpoint)
    missing = [p for p in planned if p.local is None]
    names = ", ".join(p.file.filename for p in missing)
    if missing and constants.HF_HUB_OFFLINE:
        raise HubError(
            f"{spec.name} needs {names} from {spec.repo}, not downloaded yet, and HF_HUB_OFFLINE "
            "is set: run once with network access (or `aim-mlx cache add` on a connected machine "
            "and copy its cache), or pass a local folder as the model."
        )
    hub_dir = Path(cache_dir or constants.HF_HUB_CACHE)
    needs = dict(also_needed or {})
    if missing:
        needs[hub_dir] = needs.get(hub_dir, 0) + sum(p.size for p in missing)
        check_download_cache(hub_dir)
        check_reachable(spec, missing[0].file, endpoint)
    check_disk_space(needs, what=f"{spec.name} ({head} head)")
    if missing and progress:
        total = sum(p.size for p in missing) / GB
        print(f"downloading {names} ({total:.2f} GB) from {spec.repo}", file=sys.stderr)

    paths = []
    for p in planned:
        path = p.local or fetch(spec, p.file, cache_dir=cache_dir, endpoint=endpoint)
        verify(spec, p.file, path, progress=progress)
        paths.append(path)
    return paths


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


def check_reachable(spec: ModelSpec, file: HubFile, endpoint=None) -> None:
    """Ask the hub about one file, once: a connection or name-resolution failure ends here, with
    advice, rather than after huggingface_hub's retries. Other errors are left to the download."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(spec.repo, file.filename, revision=spec.revision, endpoint=endpoint)
    try:
        get_hf_file_metadata(url)
    except Exception as e:
        if _is_connection_error(e):
            raise HubError(
                f"cannot reach the hub for {spec.repo} ({e}). {NO_NETWORK_HINT}"
            ) from None


def _is_connection_error(error: BaseException | None) -> bool:
    """A failure to connect or to resolve the host name, in any HTTP client's exception types."""
    while error is not None:
        names = {cls.__name__ for cls in type(error).__mro__}
        if names & {"ConnectError", "ConnectTimeout", "ConnectionError", "NameResolutionError"}:
            return True
        error = error.__cause__ or error.__context__
    return False


ATTEMPTS = 3


def fetch(spec: ModelSpec, file: HubFile, *, cache_dir=None, endpoint=None) -> Path:
    """hf_hub_download, tried again after a transient failure (huggingface_hub resumes or
    restarts the file, depending on its version); failures become HubError messages."""
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
            raise HubError(
                f"{where} is not downloaded yet and the hub cannot be reached: {e} "
                f"{NO_NETWORK_HINT}"
            ) from None
        except Exception as e:  # network and HTTP errors of huggingface_hub and its HTTP client
            if _is_connection_error(e):
                raise HubError(f"downloading {where} failed: {e}. {NO_NETWORK_HINT}") from None
            if _is_permanent(e) or attempt == ATTEMPTS:
                raise HubError(f"downloading {where} failed: {e}") from e
            attempt += 1
            print(f"{where}: {e}; trying again ({attempt}/{ATTEMPTS})", file=sys.stderr)
            time.sleep(attempt - 1)


def _is_permanent(error: Exception) -> bool:
    """Errors that another attempt cannot fix: missing repo, file or revision, no access."""
    from huggingface_hub import utils

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


def verify(spec: ModelSpec, file: HubFile, path: Path, progress: bool = True) -> None:
    """Refuse a file whose SHA-256 does not start with the registry's prefix.

    A file that fails is removed from the download cache, so the next run fetches it afresh.
    """
    digest = file_sha256(path, progress=progress and sys.stderr.isatty())  # a bar: terminals only
    if digest.startswith(file.sha256):
        return
    remove_cached_file(path)
    raise ChecksumError(
        f"checksum mismatch for {file.filename} from {spec.repo}: its SHA-256 is {digest[:16]}..., "
        f"expected {file.sha256}... The file was removed from the download cache; run the "
        "command again to download it afresh. If this repeats, the file on the hub is not the "
        "one aim-mlx knows: do not use it."
    )


def remove_cached_file(path: Path) -> int:
    """Delete a file from huggingface_hub's cache (the blob and its snapshot link); bytes freed."""
    blob = path.resolve()
    size = blob.stat().st_size if blob.exists() else 0
    for p in {blob, path}:
        if p.is_symlink() or p.exists():
            p.unlink()
    return size


def downloaded(spec: ModelSpec, cache_dir=None) -> list[tuple[HubFile, Path]]:
    """The model's files that are in the download cache."""
    files = [spec.backbone, *spec.heads.values()]
    return [(f, path) for f in files if (path := cached_path(spec, f, cache_dir))]


def remove_downloads(spec: ModelSpec, cache_dir=None) -> int:
    """Drop a model's raw checkpoints from the download cache; bytes freed."""
    return sum(remove_cached_file(path) for _, path in downloaded(spec, cache_dir))


def free_bytes(folder: Path) -> tuple[Path, int]:
    """(the nearest existing ancestor, its free bytes)."""
    folder = Path(folder).expanduser().absolute()
    while not folder.exists():
        folder = folder.parent
    return folder, shutil.disk_usage(folder).free


def check_disk_space(needs: dict[Path, int], what: str = "the model") -> None:
    """Raise DiskSpaceError unless every file system has room for what goes on it."""
    per_device: dict[int, list] = {}
    for folder, nbytes in needs.items():
        existing, free = free_bytes(folder)
        entry = per_device.setdefault(os.stat(existing).st_dev, [0, free, []])
        entry[0] += nbytes
        entry[2].append(f"{nbytes / GB:.2f} GB in {folder}")
    for total, free, parts in per_device.values():
        if total > free:
            raise DiskSpaceError(
                f"not enough free disk space for {what}: it needs about {total / GB:.2f} GB "
                f"({', '.join(parts)}) but only {free / GB:.2f} GB is free there. Free some "
                "space, or point HF_HOME (downloads) and AIM_MLX_CACHE (converted models) "
                "to a larger disk."
            )
