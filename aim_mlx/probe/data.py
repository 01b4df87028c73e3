"""Labelled image folders (one sub-folder per class), their checks and a stratified split."""

from __future__ import annotations

import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .. import images, transforms
from ..checks import check_path
from ..errors import AimMlxError
from ..images import file_id


class ProbeError(AimMlxError, ValueError):
    """A user-facing problem with a dataset, a head folder or the training options."""


@dataclass
class Sample:
    path: str
    label: int  # index into the class list


@dataclass
class Dataset:
    root: str
    classes: list[str]  # sorted sub-folder names
    samples: list[Sample]
    skipped: list[tuple[str, str]]  # (path, reason): files that are not readable images

    def counts(self) -> list[int]:
        return np.bincount([s.label for s in self.samples], minlength=len(self.classes)).tolist()


def _header_error(path: str) -> str | None:
    """Why PIL cannot even identify this file, or None. Only the header is read: a truncated
    image (or one past the pixel limit) passes here and is caught when decoded for feature
    extraction."""
    transforms.register_heif()  # HEIC / HEIF: iPhone photos
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path):
                return None
    except Image.DecompressionBombError:
        return None  # refused, with its reason, when decoded
    except PermissionError:
        return "cannot be read: permission denied"
    except Exception:
        return transforms.unreadable_reason(path)


def class_folders(
    root: str | Path, what: str = "training folder", errors: list | None = None
) -> dict[str, list[str]]:
    """{class name (`class_name`): image paths} of the non-hidden sub-folders of `root`, sorted
    by name; folders that cannot be read, and images directly in `root` (in no class), are
    added to `errors` as (path, reason)."""
    check_path(f"the {what}", root)
    root = Path(root)
    if not root.is_dir():
        raise ProbeError(f"{what} {root} is not a folder")
    try:
        folders, loose = images.dataset_listing(root)
    except OSError as e:
        raise ProbeError(f"{what} {root}: cannot read the folder: {e.strerror or e}") from None
    if not folders:
        held = f"; its {len(loose)} images lie directly in it" if loose else ""
        raise ProbeError(
            f"{what} {root} has no class sub-folders{held}: put each class's images in its own "
            f"sub-folder ({root}/cat/..., {root}/dog/...)"
        )
    if errors is not None:
        errors += [(path, images.LOOSE) for path in loose]
    found = {}
    for f in folders:
        try:
            f.name.encode("utf-8")  # bytes that are not UTF-8 (Linux): surrogate escapes
        except UnicodeEncodeError:
            raise ProbeError(
                f"{what} {root}: the class folder name {f.name!r} is not UTF-8 text, which a "
                "head's config.json and a Core ML model's labels hold; rename the folder"
            ) from None
        name = class_name(f.name)
        if name in found:
            raise ProbeError(
                f"{what} {root}: class folders {f.name!r} and {found[name][0]!r} are the same "
                "name in two Unicode forms; merge or rename them"
            )
        # a link back to the root would put the other classes' images in this one
        found[name] = (f.name, images.walk_images(str(f), errors, above=[root]))
    return {name: paths for name, (_, paths) in sorted(found.items())}


def class_name(folder_name: str) -> str:
    """A class's name from its folder's: Unicode NFC, so that a folder written on macOS (often
    decomposed, NFD) and one written on Linux (NFC) are the same class."""
    return unicodedata.normalize("NFC", folder_name)


def read_dataset(root: str | Path, what: str = "training folder") -> Dataset:
    """The labelled images of `root`; files PIL cannot identify are listed in `skipped`.

    Raises ProbeError for a missing folder, fewer than two classes, or a class without a
    usable image.
    """
    skipped = []  # folders, then files, that cannot be read
    found = class_folders(root, what, skipped)
    if len(found) < 2:
        (name,) = found
        raise ProbeError(
            f"{what} {root} has a single class ({name!r}); a classifier needs at least two "
            "class sub-folders"
        )
    classes = list(found)
    samples, empty = [], []
    for label, name in enumerate(classes):
        usable = 0
        for path in found[name]:
            if reason := _header_error(path):
                skipped.append((path, reason))
                continue
            samples.append(Sample(path, label))
            usable += 1
        if not usable:
            empty.append(name)
    if empty:
        raise ProbeError(
            f"{what} {root}: class folder(s) {', '.join(map(repr, empty))} hold no usable image; "
            "add images or remove the folder"
        )
    samples = one_name_per_file(root, what, classes, samples, skipped)
    return Dataset(str(root), classes, samples, skipped)


def one_name_per_file(root, what: str, classes: list[str], samples: list[Sample], skipped: list):
    """`samples` with one name per file: the split could otherwise train on one name of an image
    (a link or a hard link) and validate on another; the other names go to `skipped`. A file in
    two classes is refused: one image with two labels."""
    pairs = [(s.path, s.label) for s in samples]
    kept, others = images.one_name_per_file(pairs, classes, f"{what} {root}", ProbeError)
    skipped += [(path, f"the same file as {first}") for path, first in others]
    return [Sample(path, label) for path, label in kept]


def check_same_classes(train: Dataset, val: Dataset) -> None:
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ProbeError(
            f"the training folder {train.root} and the validation folder {val.root} must have "
            f"the same class sub-folders; only in training: {only_train or 'none'}, only in "
            f"validation: {only_val or 'none'}"
        )


def stratified_split(
    dataset: Dataset, val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """(train, val): `val_fraction` of each class (at least one image when the class has two or
    more), chosen with a seeded generator; each list keeps the folder order."""
    if not 0 < val_fraction < 1:
        raise ProbeError(f"the validation split must be between 0 and 1, got {val_fraction}")
    rng = np.random.default_rng(seed)
    by_label = [[] for _ in dataset.classes]  # each class's samples, in one pass
    for i, s in enumerate(dataset.samples):
        by_label[s.label].append(i)
    train, val = [], []
    for members in by_label:
        n_val = min(len(members) - 1, max(1, round(val_fraction * len(members))))
        chosen = set(rng.permutation(members)[:n_val].tolist())
        train += [i for i in members if i not in chosen]
        val += [i for i in members if i in chosen]
    return [dataset.samples[i] for i in sorted(train)], [dataset.samples[i] for i in sorted(val)]


def check_apart(train: Dataset, val: Dataset) -> None:
    """Refuse validation images that are training images too (the same folder, one inside the
    other, a link or a hard link): the best epoch would be chosen on images the head was
    trained on."""
    trained = {file_id(s.path) for s in train.samples}
    shared = [s.path for s in val.samples if file_id(s.path) in trained]
    if shared:
        raise ProbeError(
            f"{len(shared)} image(s) of the validation folder {val.root} are training images "
            f"of {train.root} too (e.g. {shared[0]}): the best epoch would be chosen on images "
            "the head was trained on; pass a separate folder, or leave out val_dir (--val) to "
            "hold out a part of the training folder"
        )
