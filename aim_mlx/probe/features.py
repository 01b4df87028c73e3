"""The on-disk cache of the trunk's features: the head's input, extracted once per image.

Layout under the cache root (AIM_MLX_CACHE):

    features/<set key>/info.json          what the set holds (trunk, dtype, layers, image size)
    features/<set key>/<sha256>.npy       one image: float16 (N_tokens, D), the head's input

A set is keyed by the trunk (the SHA-256 of its source weights and its number of attention
heads, which the weights do not hold), its dtype and quantization, the probe layers, the image
size and SET_FORMAT; an image by the SHA-256 of its file's bytes. Each image is written to a
temporary file and renamed, so an interrupted extraction leaves only complete
files and the next run computes only the missing ones (and removes the temporary files of
killed runs). Features are stored in float16 whatever the trunk computes in (half the disk of
float32; aim-600M: 256 x 1536 x 2 bytes = 786 KB).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from numpy.lib import format as npy

from .. import cache, distributed, images
from ..output import dead_leftovers, disk_full, write_atomic, write_failure
from .data import ProbeError, Sample

FEATURE_DTYPE = np.float16
# In every set's key: bump it when what an image gives changes (preprocessing, the stored
# layout), so that older features are never read as this version's.
SET_FORMAT = 1


@dataclass(frozen=True)
class TrunkInfo:
    """What identifies a feature extractor: the source weights and how they are stored."""

    name: str
    sha256: str  # of the trunk's source checkpoint(s), whatever dtype the model runs in
    dtype: str
    quantization: str  # "none" or e.g. "q4g64"
    embed_dim: int
    num_blocks: int
    img_size: int
    num_heads: int  # not in the weights: a backbone converted with another --num-heads differs

    def describe(self) -> str:
        return f"{self.name} (weights sha256 {self.sha256[:12]}, {self.num_heads} heads)"


def trunk_info(model_dir: str | Path) -> TrunkInfo:
    """The identity of the trunk in a converted model folder, from its config.json.

    The SHA-256 is that of the source files holding trunk weights (head files are left out; a
    hub-style `pytorch_model.bin` holding both is taken whole; several backbone shards are
    combined). Folders converted before the converter recorded which they are: by file name.
    """
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    recorded = config.get("sources") or []
    if all("trunk" in s for s in recorded):
        sources = [s for s in recorded if s["trunk"]]
    else:
        sources = [s for s in recorded if "head" not in s["file"].lower()]
    if not sources:
        raise ProbeError(
            f"{model_dir}/config.json records no trunk source files and their SHA-256, which a "
            "trained head is tied to; convert the checkpoints again with this aim-mlx"
        )
    if len(sources) == 1:
        sha = sources[0]["sha256"]
    else:
        sha = hashlib.sha256("".join(s["sha256"] for s in sources).encode()).hexdigest()
    q = config.get("quantization")
    return TrunkInfo(
        name=config.get("name") or model_dir.name,
        sha256=sha,
        dtype=config["dtype"],
        quantization=f"q{q['bits']}g{q['group_size']}" if q else "none",
        embed_dim=config["embed_dim"],
        num_blocks=config["num_blocks"],
        img_size=config.get("img_size", 224),
        num_heads=config["num_heads"],
    )


def set_key(trunk: TrunkInfo, probe_layers, img_size: int, dtype: str) -> str:
    """The feature set's folder name. `dtype`: the weights' dtype the trunk ran with."""
    layers = "-".join(str(i) for i in sorted(probe_layers))  # averaged: in any order
    key = f"{trunk.name}-{trunk.sha256[:12]}-h{trunk.num_heads}--{dtype}--{trunk.quantization}"
    key += f"--L{layers}--{img_size}px--f{SET_FORMAT}"
    return cache.safe_name(key)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class FeatureSet:
    """One folder of cached features, each image's (N_tokens, D) `shape`; `load(keys)` reads a
    batch."""

    def __init__(self, folder: Path, info: dict, shape: tuple[int, int]):
        self.folder, self.info, self.shape = folder, info, shape

    @classmethod
    def open(cls, key: str, info: dict, shape: tuple[int, int]) -> FeatureSet:
        folder = cache.features_root() / key
        try:
            folder.mkdir(parents=True, exist_ok=True)
            info_file = folder / "info.json"
            if not info_file.is_file():
                write_atomic(info_file, lambda f: f.write(json.dumps(info, indent=1).encode()))
            for partial, _ in dead_leftovers(folder):  # of extractions killed mid-write
                partial.unlink(missing_ok=True)
        except OSError as e:
            raise ProbeError(
                f"cannot write the feature cache {folder} ({e.strerror}); set {cache.CACHE_ENV} "
                "to a writable folder"
            ) from None
        return cls(folder, info, shape)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.npy"

    def has(self, key: str) -> bool:
        """Whether the image's features are stored; a damaged file (cut short, not a .npy,
        another shape or dtype) is removed, so that they are extracted again."""
        path = self.path(key)
        if not path.is_file():
            return False
        if _is_complete(path, self.shape):
            return True
        path.unlink(missing_ok=True)
        return False

    def write(self, key: str, features: np.ndarray) -> None:
        try:
            write_atomic(self.path(key), lambda f: np.save(f, features))
        except OSError as e:
            fix = "free some space, or set" if disk_full(e) else "set"
            raise ProbeError(
                f"cannot write the feature cache {self.folder} ({write_failure(e)}); {fix} "
                f"{cache.CACHE_ENV} to a writable folder with room"
            ) from None

    def load(self, keys: list[str]) -> np.ndarray:
        """(len(keys), N, D) float16."""
        arrays = []
        for k in keys:
            try:
                arrays.append(np.load(self.path(k), allow_pickle=False))
            except (OSError, ValueError, EOFError) as e:  # damaged since `has` checked it
                raise ProbeError(
                    f"{self.path(k)}: cannot read the cached features ({e}); remove the set "
                    f"with `aim-mlx cache rm {self.folder.name}` and run again"
                ) from None
        return np.stack(arrays)


def _is_complete(path: Path, shape: tuple[int, int]) -> bool:
    """An .npy file of float16 `shape`, whole: its header and the size of its data."""
    readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            header = readers[npy.read_magic(f)](f)
            data_start = f.tell()
    except (OSError, ValueError, KeyError, EOFError):
        return False
    stored_shape, fortran, dtype = header
    nbytes = int(np.prod(shape)) * np.dtype(FEATURE_DTYPE).itemsize
    return (stored_shape, fortran, dtype) == (
        tuple(shape),
        False,
        np.dtype(FEATURE_DTYPE),
    ) and path.stat().st_size == data_start + nbytes


@dataclass
class Extracted:
    samples: list[Sample]  # the usable ones, in input order
    keys: list[str]  # their feature keys (image content SHA-256)
    errors: list[tuple[str, str]]  # (path, reason)
    computed: int  # images run through the trunk now (the others came from the cache)


def _open_set(model, trunk: TrunkInfo) -> FeatureSet:
    """The feature set of `model` (an AIM: its dtype, probe layers and image size) with the
    weights of `trunk`."""
    args = model.args
    dtype = str(model.dtype).split(".")[-1]
    key = set_key(trunk, args.probe_layers, args.img_size, dtype)
    info = dict(
        format=SET_FORMAT,
        trunk=asdict(trunk),
        dtype=dtype,
        probe_layers=sorted(args.probe_layers),
        img_size=args.img_size,
        feature_dtype=np.dtype(FEATURE_DTYPE).name,
    )
    shape = ((args.img_size // args.patch_size) ** 2, args.embed_dim)
    return FeatureSet.open(key, info, shape)


def _read_keys(samples: list[Sample]) -> tuple[list[images.Item], list[str]]:
    """Each sample's image item and feature key (its file's SHA-256); a file that cannot be
    read: an item with its error, and the key ""."""
    items, keys = [], []
    for s in samples:
        try:
            keys.append(file_sha256(s.path))
            items.append(images.Item(s.path))
        except OSError as e:
            keys.append("")
            items.append(images.Item(s.path, f"cannot read the file ({e.strerror})"))
    return items, keys


def _missing(store: FeatureSet, items: list[images.Item], keys: list[str]) -> list[int]:
    """The indices of the readable items whose features `store` lacks, one per key."""
    todo, seen = [], set()
    for i, (item, k) in enumerate(zip(items, keys, strict=True)):
        if item.error is None and not store.has(k) and k not in seen:
            todo.append(i)
            seen.add(k)
    return todo


def extract(
    model,
    trunk: TrunkInfo,
    samples: list[Sample],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[FeatureSet, Extracted]:
    """Make sure every readable image of `samples` has its features in the cache.

    `model`: the trunk (an AIM whose `args.probe_layers` are the layers to average).
    """
    store = _open_set(model, trunk)
    items, keys = _read_keys(samples)
    # Under mlx.launch the ranks share out rank 0's list (its cache holds the features).
    todo = [(items[i], keys[i]) for i in distributed.from_root(_missing(store, items, keys))]

    def head_input(x: mx.array) -> np.ndarray:
        out = model.head_input(model.extract_features(x)).astype(mx.float32)
        return np.array(out)

    todo_key = {id(item): k for item, k in todo}
    computed = 0
    for item, row in images.run(
        head_input,
        [item for item, _ in todo],
        not_finite=images.not_finite_error(model),
        size=model.args.img_size,
        batch_size=batch_size,
        progress=progress,
        desc="features",
    ):
        if row is None:
            continue
        narrow = row.astype(FEATURE_DTYPE)
        if not np.isfinite(narrow).all():
            raise ProbeError(
                f"{item.path}: its features leave float16's range (max |value| "
                f"{np.abs(row).max():.4g}); the feature cache cannot store them"
            )
        store.write(todo_key[id(item)], narrow)
        computed += 1

    ok, ok_keys, errors = [], [], []
    for s, item, k in zip(samples, items, keys, strict=True):
        if item.error is None and store.has(k):
            ok.append(s)
            ok_keys.append(k)
        else:
            errors.append((s.path, item.error or "could not be read"))
    return store, Extracted(ok, ok_keys, errors, computed)
