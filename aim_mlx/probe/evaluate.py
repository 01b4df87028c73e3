"""Accuracy of a trained head on a labelled folder, per class, and a confusion-matrix picture."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .. import distributed, images
from ..constants import as_dtype_name
from ..errors import OptionError
from ..evaluate import Evaluation, top5_predictions
from ..output import prepare_output, write_atomic
from .data import ProbeError, class_folders, class_name


@dataclass
class HeadEvalResult:
    top1: float | None  # percent, as `aim_mlx.evaluate.EvalResult`; None: no image read
    top5: float | None  # None with 5 classes or fewer, or no image read
    images: int
    classes: int  # distinct classes among the images
    labels: list[str]  # the head's classes, in logit order
    confusion: np.ndarray  # (C, C) counts: row = true class, column = predicted
    failed: list[tuple[str, str]] = field(default_factory=list)

    def per_class(self) -> dict[str, dict]:
        """{class: {"images": n, "top1": percent or None}}"""
        out = {}
        for i, name in enumerate(self.labels):
            n = int(self.confusion[i].sum())
            out[name] = {"images": n, "top1": 100.0 * self.confusion[i, i] / n if n else None}
        return out

    def to_dict(self) -> dict:
        return dict(
            top1=self.top1,
            top5=self.top5,
            images=self.images,
            classes=self.classes,
            failed=[{"path": p, "error": e} for p, e in self.failed],
            per_class=self.per_class(),
            labels=self.labels,
            confusion=self.confusion.tolist(),
        )


def labelled_images(
    data_path: str | Path, labels: list[str], head: str, errors: list | None = None
) -> list[tuple[str, int]]:
    """(image path, class index) for the images of `data_path`'s class sub-folders, which must
    be among `labels`, the classes of the trained head `head`; folders that cannot be read are
    added to `errors` as (path, reason)."""
    found = class_folders(data_path, "evaluation folder", errors)
    index = {}  # heads made before NFC may hold names that are not
    for i, name in enumerate(labels):
        if (same := index.setdefault(class_name(name), i)) != i:
            raise ProbeError(
                f"the head {head} has classes {labels[same]!r} and {name!r}, the same name in two "
                "Unicode forms; train it again (class folders are now matched in one form)"
            )
    unknown = sorted(set(found) - set(index))
    if unknown:
        raise ProbeError(
            f"evaluation folder {data_path}: class sub-folder(s) {unknown} are not classes of the "
            f"head {head} ({', '.join(labels)})"
        )
    pairs = [(p, index[name]) for name, paths in found.items() for p in paths]
    if not pairs:
        raise ProbeError(f"evaluation folder {data_path}: no images in its class sub-folders")
    where = f"evaluation folder {data_path}"
    pairs, others = images.one_name_per_file(pairs, labels, where, ProbeError)  # counted once
    if errors is not None:
        errors += [(path, f"the same file as {first}: counted once") for path, first in others]
    return pairs


def evaluate_head(
    model, data_path: str | Path, *, batch_size: int = 8, progress: bool = False
) -> HeadEvalResult:
    """`model`: an AIM with a trained head (`aim_mlx.load(M, head=FOLDER)`). `data_path` has one
    sub-folder per class, named like the head's classes (a subset of them is fine)."""
    trained = getattr(model, "trained_head", None)
    if trained is None:
        raise ProbeError("the model has no trained head; load it with head=FOLDER")
    labels = list(trained.classes)
    failed = []  # (path, reason): unreadable folders, then images
    pairs = labelled_images(data_path, labels, trained.path, failed)
    target = dict(pairs)
    C = len(labels)
    confusion = np.zeros((C, C), dtype=np.int64)
    hits5 = 0

    for item, pred in top5_predictions(
        model,
        [p for p, _ in pairs],
        size=model.args.img_size,
        batch_size=batch_size,
        progress=progress,
    ):
        if item.error:
            failed.append((item.path, item.error))
            continue
        y = target[item.path]
        confusion[y, pred[0]] += 1
        hits5 += int(y in pred)
    n = int(confusion.sum())
    top1 = 100.0 * np.trace(confusion) / n if n else None  # no accuracy, as `aim-mlx eval`
    top5 = 100.0 * hits5 / n if n and C > 5 else None  # with 5 classes it is always 100
    present = int((confusion.sum(axis=1) > 0).sum())
    return HeadEvalResult(top1, top5, n, present, labels, confusion, failed)


def evaluate_trained_head(
    model: str | os.PathLike,
    data: str | os.PathLike,
    head: str | os.PathLike,
    *,
    dtype: str | None = None,
    quantize_bits: int | None = None,
    batch_size: int = 8,
    confusion: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = False,
) -> Evaluation | None:
    """`evaluate_head` of the trained head in the folder `head` on the trunk `model`, as
    `aim_mlx.load(model, head, dtype, quantize_bits=)` gives them, on `data` (one sub-folder per
    class); with `confusion`, the confusion matrix drawn to that .png file.

    Checked before the model is loaded (perhaps downloaded): the head's folder, the options,
    the picture's path (an existing file is replaced only with `force`; missing folders are
    created) and `data`'s classes. Under `mlx.launch` every rank evaluates its share; rank 0
    writes the picture and returns the result, the other ranks None.
    """
    from ..resolve import check_model_ref, load
    from .head import is_head_folder, read_head_config

    check_model_ref(model)
    if not is_head_folder(head):
        given = "" if head is None else f", got {head!r}"
        raise OptionError(
            f"head (--head) must be a trained head's folder (from `probe train`){given}"
        )
    images.check_positive("batch_size (--batch-size)", batch_size)
    if confusion is not None:
        if Path(confusion).suffix.lower() != ".png":
            raise OptionError(f"confusion (--confusion) must end in .png, got {str(confusion)!r}")
        inputs = [model, head, data]  # checked by rank 0, which writes it (mlx.launch)
        target = distributed.on_root(lambda: prepare_output(confusion, force=force, inputs=inputs))
    labelled_images(data, read_head_config(head)["classes"], head)  # before loading the trunk
    distributed.group()  # under mlx.launch: join the other ranks, share this machine's cores
    net = load(model, head, dtype, quantize_bits=quantize_bits, progress=progress)
    result = evaluate_head(net, data, batch_size=batch_size, progress=progress)
    if not distributed.is_root():  # under mlx.launch: rank 0 has every rank's counts
        return None
    if confusion is not None:
        title = f"{Path(head).name}: {heading_of(result)} of {data}"
        save_confusion(result, target, title, replace=force)
    return Evaluation(str(model), str(head), as_dtype_name(net.dtype), net.args.img_size, result)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def heading_of(result: HeadEvalResult) -> str:
    if result.top1 is None:
        return "no image could be read"
    return f"top-1 {result.top1:.1f}% on {result.images} images"


MATRIX_PIXELS = 8192  # the matrix's side at most: 1000 classes at 28 px took 3.4 GB and 27 s


def _cell_size(classes: int) -> int:
    """A matrix cell's side in pixels: 28 to 64, less where the matrix would be wider than
    MATRIX_PIXELS."""
    cell = max(28, min(64, 900 // max(classes, 1)))
    if classes * cell > MATRIX_PIXELS:
        cell = max(1, MATRIX_PIXELS // classes)
    return cell


def _cell_colours(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each cell's share of its row, the cells' RGB colours): blue on the diagonal, red
    elsewhere, the deeper the larger the share."""
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros(m.shape), where=rows > 0)
    level = (255 * (1 - share)).astype(np.uint8)
    colours = np.stack([level, level, np.full_like(level, 255)], axis=-1)
    off = ~np.eye(len(m), dtype=bool)
    colours[off] = np.stack([np.full_like(level, 255), level, level], axis=-1)[off]
    return share, colours


def _upwards(text: str, font, fill, width: int) -> Image.Image:
    """`text` (`width` pixels wide) on white, written upwards."""
    strip = Image.new("RGB", (width + 4, 18), "white")
    ImageDraw.Draw(strip).text((2, 0), text, fill=fill, font=font)
    return strip.rotate(90, expand=True)


def confusion_image(result: HeadEvalResult, title: str = "") -> Image.Image:
    """The confusion matrix as a picture: rows are the true classes, columns the predicted
    ones; each cell is shaded by the share of its row and shows the count. With hundreds of
    classes the cells shrink (MATRIX_PIXELS across), without counts, then without names."""
    labels, m = result.labels, result.confusion
    C = len(labels)
    cell = _cell_size(C)
    counts, names = cell >= 28, cell >= 14  # what fits in a cell
    font, small = _font(max(11, cell // 3)), _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def width(text, f):
        return probe.textbbox((0, 0), text, font=f)[2]

    margin = (max(width(name, small) for name in labels) if names else 0) + 16
    top = margin + 48
    left = margin + 40
    heading = title or heading_of(result)
    wide = max(left + C * cell + 20, width(heading, _font(16)) + 20)  # the title fits too
    img = Image.new("RGB", (wide, top + C * cell + 20), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), heading, fill="black", font=_font(16))
    share, colours = _cell_colours(m)
    cells = Image.fromarray(colours).resize((C * cell, C * cell), Image.Resampling.NEAREST)
    img.paste(cells, (left, top))
    if cell >= 4:  # the grid
        for i in range(C + 1):
            x, y = left + i * cell, top + i * cell
            draw.line([(x, top), (x, top + C * cell)], fill=(200, 200, 200))
            draw.line([(left, y), (left + C * cell, y)], fill=(200, 200, 200))
    for i in range(C) if counts else ():
        for j in range(C):
            x0, y0 = left + j * cell, top + i * cell
            text = str(int(m[i, j]))
            ink = "white" if share[i, j] > 0.6 else "black"
            tw = width(text, font)
            draw.text((x0 + (cell - tw) / 2, y0 + cell / 2 - cell / 6), text, fill=ink, font=font)
    for i, name in enumerate(labels if names else ()):  # true classes down the left
        y = top + i * cell + cell / 2 - 7
        draw.text((left - 8 - width(name, small), y), name, fill="black", font=small)
        strip = _upwards(name, small, "black", width(name, small))  # predicted, across the top
        img.paste(strip, (int(left + i * cell + cell / 2 - 9), top - 8 - strip.height))
    draw.text((left, top - margin - 26), "predicted", fill=(90, 90, 90), font=small)
    axis = _upwards("true", small, (90, 90, 90), width("true", small))
    img.paste(axis, (4, int(top + C * cell / 2 - axis.height / 2)))
    return img


def save_confusion(
    result: HeadEvalResult, path: str | Path, title: str = "", replace: bool = True
) -> Path:
    """The picture written to `path`; `replace=False` keeps a file already there (OutputError)."""
    picture = confusion_image(result, title)
    return write_atomic(path, lambda f: picture.save(f, format="PNG"), replace)
