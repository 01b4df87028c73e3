"""Top-k ImageNet classes for images and folders of images."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import mlx.core as mx
import numpy as np

from . import distributed, images
from .labels import imagenet_classes, label


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, k: int = 5, labels=None) -> list[dict]:
    """[{"index", "label", "prob"}] for one image's logits, most likely first; `labels`: the
    class names (default: ImageNet-1k's)."""
    probs = softmax(logits)
    order = np.argsort(-logits, kind="stable")[:k]
    name = labels.__getitem__ if labels is not None else label
    return [{"index": int(i), "label": name(int(i)), "prob": float(probs[i])} for i in order]


def class_names(model) -> tuple[str, ...] | None:
    """The names of the model's classes: a trained head's, None for ImageNet-1k's (a head of
    1000 classes), else "class I": a converted head of another size, not ImageNet's classes."""
    n = model.args.num_classes
    if model.labels is not None or n == len(imagenet_classes()):
        return model.labels
    return tuple(f"class {i}" for i in range(n))


def classify_iter(
    model,
    inputs: Iterable[str | os.PathLike],
    *,
    k: int = 5,
    batch_size: int = 8,
    progress: bool = False,
    img_size: int | None = None,
) -> Iterator[dict]:
    """Like `classify`, one row at a time as batches finish."""
    images.check_model(model)
    k = min(images.check_positive("k (--top-k)", k), model.args.num_classes)
    images.check_positive("batch_size (--batch-size)", batch_size)
    items = images.collect(inputs)
    labels = class_names(model)  # None: ImageNet-1k's

    def logits(x: mx.array) -> np.ndarray:
        return np.array(model(x).astype(mx.float32))

    for item, row in images.run(
        logits,
        items,
        not_finite=images.not_finite_error(model),
        size=images.input_size(model, img_size),
        batch_size=batch_size,
        progress=progress,
        desc="classify",
    ):
        if item.error:
            yield {"path": item.path, "error": item.error}
        else:
            yield {"path": item.path, "top_k": top_k(row, k, labels)}


def load_and_classify(
    model: str | os.PathLike,
    inputs: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    head: str | None = None,
    dtype: str | None = None,
    quantize_bits: int | None = None,
    k: int = 5,
    batch_size: int = 8,
    img_size: int | None = None,
    progress: bool = False,
) -> Iterator[dict] | None:
    """`classify_iter`'s rows, with the model that `aim_mlx.load(model, head, dtype,
    quantize_bits=)` gives, loaded before this returns. Inputs holding no image at all: one
    error row per input, and no model is loaded (perhaps downloaded). Under `mlx.launch` every
    rank classifies its share; rank 0 gets every row, the other ranks None once theirs is done.
    """
    from .resolve import check_img_size, check_model_ref, load

    check_model_ref(model)
    inputs = images.as_inputs(inputs)  # one path, or several
    # before the model is loaded (classify_iter checks them when it runs)
    images.check_positive("k (--top-k)", k)
    images.check_positive("batch_size (--batch-size)", batch_size)
    check_img_size(model, img_size)
    # under mlx.launch: a rank that finds no image still runs, and the ranks compare inputs
    if distributed.on_any(images.any_image(inputs)):
        net = load(model, head, dtype, quantize_bits=quantize_bits, progress=progress)
        rows = classify_iter(
            net, inputs, k=k, batch_size=batch_size, progress=progress, img_size=img_size
        )
    else:  # every input missing or an empty folder: said without loading a model
        rows = ({"path": path, "error": why} for path, why in images.errors(inputs))
    if distributed.is_root():
        return rows
    for _ in rows:  # under mlx.launch: this rank's share goes to rank 0
        pass
    return None


def classify(
    model,
    inputs: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    k: int = 5,
    batch_size: int = 8,
    progress: bool = False,
    img_size: int | None = None,
) -> list[dict]:
    """Classify image files and folders (searched recursively, sorted).

    `model`: an AIM model (see `aim_mlx.load`; with a trained head, its classes are the labels
    and `k` is clamped to their number; a converted head of other than ImageNet-1k's 1000
    classes has labels "class I"). Returns one row per image, in order:
    `{"path": ..., "top_k": [{"index": i, "label": ..., "prob": p}, ...]}`, or
    `{"path": ..., "error": reason}` for a file that could not be read. `img_size`: the input
    size, a multiple of the patch size (default: the model's).
    """
    return list(
        classify_iter(
            model, inputs, k=k, batch_size=batch_size, progress=progress, img_size=img_size
        )
    )
