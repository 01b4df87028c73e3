"""Top-1 / top-5 accuracy on an ImageNet-style folder (one sub-folder per WordNet id)."""

from __future__ import annotations

import itertools
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import distributed, images
from .checks import check_path
from .constants import as_dtype_name
from .errors import AimMlxError, OptionError
from .labels import imagenet_classes, wnid_to_index


class DatasetError(AimMlxError, ValueError):
    """A data folder that cannot be evaluated; the message says why."""


def imagenet_folder(
    data_path: str | Path, limit: int | None = None, errors: list | None = None
) -> list[tuple[str, int]]:
    """(image path, class index) pairs from `data_path/<wnid>/**/<image>`; folders inside it
    that cannot be read, and images directly in it, are added to `errors` as (path, reason).

    With `limit`, images are taken round-robin over the classes (the first of each class, then
    the second, ...) so that a small limit still covers every class.
    """
    if limit is not None:  # 0 was taken as no limit, -1 as all images but one
        images.check_positive("limit (--limit)", limit)
    check_path("the data folder", data_path)
    root = Path(data_path)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    folders, loose = _class_folders(root)
    unreadable = [(path, images.LOOSE) for path in loose]
    per_class = _images_per_class(root, folders, unreadable)
    # round-robin over the classes
    pairs = [p for p in itertools.chain(*itertools.zip_longest(*per_class)) if p is not None]
    if not pairs:
        reasons = "".join(f"; {path}: {why}" for path, why in unreadable[:3])
        raise DatasetError(f"{root}: no images found in WordNet-id sub-folders{reasons}")
    if errors is not None:
        errors += unreadable
    return pairs[:limit] if limit else pairs


def _class_folders(root: Path) -> tuple[list[Path], list[str]]:
    """(the class folders in `root`, the images lying directly in it); DatasetError where it
    cannot be read, holds images but no folder, or has a folder not named by a WordNet id."""
    try:
        folders, loose = images.dataset_listing(root)
    except OSError as e:
        raise DatasetError(f"{root}: cannot read the folder: {e.strerror or e}") from None
    index = wnid_to_index()
    if loose and not folders:
        raise DatasetError(
            f"{root}: its {len(loose)} images lie directly in it; eval needs them sorted into "
            "one sub-folder per class, named by WordNet id (n01440764/...). ImageNet's "
            "validation set comes as one flat folder: sort it by its labels first"
        )
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        raise DatasetError(
            f"{root}: sub-folders must be ImageNet-1k WordNet ids like n01440764; "
            f"not: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        )
    return folders, loose


def _images_per_class(root: Path, folders: list[Path], unreadable: list) -> list[list]:
    """Each class folder's (image path, class index) pairs; the paths that cannot be read, and
    the repeats of an image, are added to `unreadable` as (path, reason)."""
    index = wnid_to_index()
    per_class = [
        [(path, index[f.name]) for path in images.walk_images(str(f), unreadable, [root])]
        for f in folders
    ]
    # one name per image: a link, a hard link or a folder linked inside a class counted it twice
    wnids = {index[f.name]: f.name for f in folders}
    flat = [p for pairs in per_class for p in pairs]
    kept, others = images.one_name_per_file(flat, wnids, str(root), DatasetError)
    unreadable += [(path, f"the same file as {first}: counted once") for path, first in others]
    kept = set(kept)
    return [[p for p in pairs if p in kept] for pairs in per_class]


@dataclass
class EvalResult:
    top1: float | None  # percent; None when no image could be read
    top5: float | None
    images: int  # images evaluated
    classes: int  # distinct classes among them
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["failed"] = [{"path": p, "error": e} for p, e in self.failed]
        return d


@dataclass
class Evaluation:
    """An evaluation and what it ran: what `evaluate_model` and
    `aim_mlx.probe.evaluate.evaluate_trained_head` return."""

    model: str  # as given: a name or a folder
    head: str | None  # the head used: best, last or a trained head's folder (None: custom layers)
    dtype: str  # of the weights: "float32", ...
    img_size: int  # the images' side, in pixels
    result: EvalResult  # or a trained head's HeadEvalResult

    def to_dict(self) -> dict:
        """What `aim-mlx eval --json` (and `probe eval --json`) prints."""
        info = dict(model=self.model, head=self.head, dtype=self.dtype, img_size=self.img_size)
        return {**info, **self.result.to_dict()}


def top5_predictions(model, paths: list[str], *, size: int, batch_size: int, progress: bool):
    """(item, its top-5 class indices (5,), most likely first) for every image path, in order;
    (item with .error, None) for an unreadable one or one whose logits are not finite."""

    def logits(x: mx.array) -> np.ndarray:  # (B, classes)
        return np.array(model(x).astype(mx.float32))

    items = [images.Item(p) for p in paths]
    for item, row in images.run(
        logits,
        items,
        not_finite=images.not_finite_error(model),
        size=size,
        batch_size=batch_size,
        progress=progress,
        desc="eval",
    ):
        yield item, (None if row is None else np.argsort(-row, kind="stable")[:5])


def check_imagenet_head(model) -> None:
    """OptionError unless `model`'s classes are ImageNet-1k's, which eval's folders are."""
    n = model.args.num_classes
    if model.labels is not None:
        raise OptionError(
            f"the model's head is a trained head ({n} classes of its own), not ImageNet-1k's: "
            "evaluate it with `aim-mlx probe eval` (aim_mlx.probe.evaluate.evaluate_head)"
        )
    if n != len(imagenet_classes()):
        raise OptionError(
            f"the model's head has {n} classes, not ImageNet-1k's 1000: eval measures ImageNet "
            "accuracy; give a model with an ImageNet head"
        )


def check_eval_head(head) -> None:
    """OptionError unless `head` names an official head (None, best or last), which holds
    ImageNet-1k's classes: a trained head's folder, or a converted model's given as the head."""
    from .probe.head import is_head_folder

    if not is_head_folder(head):
        return
    folder = Path(head)
    if any(
        (folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")
    ):
        raise OptionError(
            f"head (--head) {head} is a converted model, not a head: give it as -m (model)"
        )
    if not (folder / "head.safetensors").is_file():  # a typo, or another kind of folder
        raise OptionError(f"head (--head) must be best or last, got {head!r}")
    raise OptionError(
        f"head (--head) {head} is a trained head: its classes are not ImageNet's; evaluate it "
        f"with `aim-mlx probe eval DATA -m MODEL --head {head}` (one sub-folder per class; "
        "aim_mlx.probe.evaluate.evaluate_trained_head)"
    )


def evaluate(
    model,
    data_path: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    img_size: int | None = None,
) -> EvalResult:
    """Top-1 / top-5 of `model` on an ImageNet-style folder; `img_size` defaults to the
    model's input size."""
    check_imagenet_head(model)  # before listing the folder
    pairs = imagenet_folder(data_path, limit, unreadable := [])
    return evaluate_pairs(
        model,
        pairs,
        batch_size=batch_size,
        progress=progress,
        img_size=img_size,
        failed=unreadable,
    )


def evaluate_pairs(
    model,
    pairs: list[tuple[str, int]],
    *,
    batch_size: int = 8,
    progress: bool = False,
    img_size: int | None = None,
    failed: list[tuple[str, str]] = (),
) -> EvalResult:
    """`evaluate` on (image path, class index) pairs, as `imagenet_folder` lists them;
    `failed`: (path, reason) of what could not be listed (unreadable folders), reported first."""
    images.check_positive("batch_size (--batch-size)", batch_size)
    check_imagenet_head(model)
    target = dict(pairs)
    hits1 = hits5 = n = 0
    classes, failed = set(), list(failed)

    for item, pred in top5_predictions(
        model,
        [p for p, _ in pairs],
        size=images.input_size(model, img_size),
        batch_size=batch_size,
        progress=progress,
    ):
        if item.error:
            failed.append((item.path, item.error))
            continue
        y = target[item.path]
        hits1 += int(pred[0] == y)
        hits5 += int(y in pred)
        n += 1
        classes.add(y)
    top1, top5 = (100.0 * hits1 / n, 100.0 * hits5 / n) if n else (None, None)
    return EvalResult(top1, top5, n, len(classes), failed)


def evaluate_model(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    head: str | None = None,
    dtype: str | None = None,
    quantize_bits: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    img_size: int | None = None,
    progress: bool = False,
) -> Evaluation | None:
    """`evaluate` with the model that `aim_mlx.load(model, head, dtype, quantize_bits=)` gives
    (`head`: an official one, best or last), on the ImageNet-style folder `data`.

    Checked before the model is loaded (perhaps downloaded): the head, the options (img_size
    where the model's patch size is known without loading it) and the folder, listed. Under
    `mlx.launch` every rank evaluates its share; rank 0 returns the result, the other ranks None.
    """
    from .resolve import check_img_size, check_model_ref, folder_head, load

    check_model_ref(model)
    check_eval_head(head)
    images.check_positive("batch_size (--batch-size)", batch_size)
    check_img_size(model, img_size)
    pairs = imagenet_folder(data, limit, unreadable := [])
    distributed.group()  # under mlx.launch: join the other ranks, share this machine's cores
    net = load(model, head, dtype, quantize_bits=quantize_bits, progress=progress)
    result = evaluate_pairs(
        net, pairs, batch_size=batch_size, progress=progress, img_size=img_size, failed=unreadable
    )
    if not distributed.is_root():  # under mlx.launch: rank 0 has every rank's counts
        return None
    used = head or folder_head(net.args.to_dict())  # the official head the model holds
    size = img_size or net.args.img_size
    return Evaluation(str(model), used, as_dtype_name(net.dtype), size, result)
