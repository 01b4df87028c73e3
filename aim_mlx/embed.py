"""Image features: the head's averaged probe layers, the last block or chosen blocks."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import images

POOLS = ("mean", "tokens")


def parse_layers(layers: str | Iterable[int], num_blocks: int) -> str | tuple[int, ...]:
    """Either "head", "last", or block indices ("3,5,-1" or a list; negative from the end)."""
    if isinstance(layers, str) and layers in ("head", "last"):
        return layers
    try:
        parts = layers.split(",") if isinstance(layers, str) else list(layers)
        blocks = tuple(int(i) for i in parts)
    except ValueError:
        raise ValueError(
            f"layers must be head, last or block numbers like 3,5,7; got {layers!r}"
        ) from None
    bad = [i for i in blocks if not -num_blocks <= i < num_blocks]
    if bad or not blocks:
        raise ValueError(f"blocks {bad or layers} are outside 0..{num_blocks - 1}")
    return tuple(i % num_blocks for i in blocks)


def features(model, x: mx.array, layers: str | tuple[int, ...], pool: str) -> np.ndarray:
    """x (B, 3, H, W) -> float32 features:
    head / last: (B, D) pooled, (B, N, D) tokens; blocks: (B, L, D) pooled, (B, L, N, D) tokens."""
    if layers == "head":
        out = model.head_input(model.extract_features(x))
    elif layers == "last":
        out = model.extract_features(x, -1)[-1]
    else:
        blocks = model.extract_features(x, max(layers))
        out = mx.stack([blocks[i] for i in layers], axis=1)
    if pool == "mean":
        out = out.mean(axis=-2)
    return np.array(out.astype(mx.float32))


@dataclass
class Embeddings:
    features: np.ndarray  # one row per readable image
    paths: list[str]  # in the same order
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def embed(
    model,
    inputs: Iterable[str | os.PathLike],
    *,
    layers: str | Iterable[int] = "head",
    pool: str = "mean",
    batch_size: int = 8,
    progress: bool = False,
) -> Embeddings:
    """Features of image files and folders (searched recursively, sorted)."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    layers = parse_layers(layers, model.args.num_blocks)
    rows, paths, errors = [], [], []
    for item, row in images.run(
        lambda x: features(model, x, layers, pool),
        images.collect(inputs),
        size=model.args.img_size,
        batch_size=batch_size,
        progress=progress,
        desc="embed",
    ):
        if item.error:
            errors.append((item.path, item.error))
        else:
            rows.append(row)
            paths.append(item.path)
    return Embeddings(np.stack(rows) if rows else np.zeros((0,), np.float32), paths, errors)


def save(out: str | Path, emb: Embeddings, metadata: dict | None = None) -> list[Path]:
    """Write `.safetensors` (tensor `features`, the paths as JSON in metadata key `paths`) or
    `.npy` (the paths one per line in `<out>.paths.txt`); written whole or not at all."""
    out = Path(out)
    if out.suffix not in (".safetensors", ".npy"):
        raise ValueError(f"{out}: the output must end in .safetensors or .npy")
    if out.suffix == ".safetensors":
        from safetensors.numpy import save_file

        meta = {k: str(v) for k, v in (metadata or {}).items()}
        meta["paths"] = json.dumps(emb.paths)
        _atomic(out, lambda tmp: save_file({"features": emb.features}, str(tmp), metadata=meta))
        return [out]
    listing = out.with_name(out.name + ".paths.txt")
    _atomic(out, lambda tmp: np.save(tmp, emb.features, allow_pickle=False))
    _atomic(listing, lambda tmp: tmp.write_text("".join(p + "\n" for p in emb.paths)))
    return [out, listing]


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # np.save keeps .npy
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
