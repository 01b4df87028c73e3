"""Finding images and feeding them to a model in batches, one error per unreadable file."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .checks import is_whole
from .errors import OptionError
from .transforms import AVIF_SUFFIXES, HEIF_SUFFIXES, ImageError, preprocess

IMAGE_SUFFIXES = {
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
    ".pnm", ".jfif", ".jp2", ".j2k", ".tga", ".ico", ".dib", *HEIF_SUFFIXES, *AVIF_SUFFIXES,
}  # fmt: skip


@dataclass
class Item:
    path: str  # as given, or the folder as given joined with the path found inside it
    error: str | None = None


def input_size(model, img_size: int | None = None) -> int:
    """The square input size to feed `model`: `img_size` (a positive multiple of its patch
    size) or the model's own."""
    if img_size is None:
        return model.args.img_size
    patch = model.args.patch_size
    if not is_whole(img_size) or img_size <= 0 or img_size % patch:
        raise OptionError(
            f"img_size (--img-size) must be a positive multiple of {patch}, got {img_size}"
        )
    return int(img_size)


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith(".")


def _image_files(folder: str, above: Iterable[str] = ()) -> Iterator[tuple[str, str | None]]:
    """(path, None) for each image file under a folder and (path, reason) for each folder
    that cannot be read and each image name that is a pipe, socket or device (opening a pipe
    waits for a writer, forever), in no set order. Hidden files and folders (such as macOS
    `._name.jpg` resource forks) are skipped; symlinked folders are followed, except one that
    leads back to a folder above it (a loop), `above` (e.g. a dataset's root) included."""
    stack = [(folder, frozenset(os.path.realpath(a) for a in above))]
    while stack:
        path, above = stack.pop()
        real = os.path.realpath(path)
        if real in above:
            continue
        try:
            with os.scandir(path) as it:
                entries = [e for e in it if not e.name.startswith(".")]
        except OSError as e:
            yield path, f"cannot read the folder: {e.strerror or e}"
            continue
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # through a symlink too
            except OSError:  # a symlink loop, a folder that cannot be looked at
                is_dir = False  # read as a file: its error then names the reason
            if is_dir:
                stack.append((entry.path, above | {real}))
            elif is_image_name(entry.name):
                yield entry.path, _not_a_file(entry)


def _not_a_file(entry: os.DirEntry) -> str | None:
    """Why an entry is not read as an image: it is a pipe, socket or device. None for a file,
    and for a broken link (its error comes when it is read)."""
    try:
        mode = entry.stat().st_mode  # through a symlink
    except OSError:
        return None
    return None if S_ISREG(mode) else "not a regular file (a pipe, socket or device)"


def walk_images(
    folder: str, errors: list[tuple[str, str]] | None = None, above: Iterable[str] = ()
) -> list[str]:
    """Image files under a folder, recursively, in sorted order; hidden ones skipped. Folders
    that cannot be read, and pipes or devices with image names, are added to `errors` as
    (path, reason), in sorted order. `above`: folders holding `folder` (a dataset's root, whose
    class sub-folders are walked one by one), never walked into through a link."""
    found, unreadable = [], []
    for path, error in _image_files(folder, above):
        if error:
            unreadable.append((path, error))
        else:
            found.append(path)
    if errors is not None:
        errors += sorted(unreadable)
    return sorted(found)


LOOSE = "directly in the dataset folder, in no class sub-folder: left out"


def dataset_listing(folder: str | Path) -> tuple[list[Path], list[str]]:
    """(sub-folders, image names that are not folders) directly in a dataset folder, each sorted,
    hidden ones skipped: its class folders, and the images in no class. OSError if it cannot be
    listed."""
    folders, loose = [], []
    with os.scandir(folder) as entries:
        for e in entries:
            if e.name.startswith("."):
                continue
            if _is_dir(e):
                folders.append(Path(e.path))
            elif is_image_name(e.name):
                loose.append(e.path)
    return sorted(folders), sorted(loose)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # through a symlink too
    except OSError:  # a symlink loop: one entry, not the whole listing
        return False


def any_image(inputs: Iterable[str | os.PathLike]) -> bool:
    """Whether `collect` would find something to read: an input that exists and is not a
    folder, or a folder with an image inside. Stops at the first, so it is cheap enough to ask
    before a model is loaded."""
    return any(
        (os.path.exists(given) and not os.path.isdir(given))
        or any(error is None for _, error in _image_files(given))
        for given in map(str, inputs)
    )


def as_inputs(inputs: Iterable[str | os.PathLike] | str | os.PathLike) -> list[str]:
    """Paths given to the Python API as a list of strings: one path alone is one input."""
    if isinstance(inputs, (str, os.PathLike)):
        return [os.fspath(inputs)]
    try:
        inputs = [inputs] if isinstance(inputs, (bytes, bytearray)) else list(inputs)
    except TypeError:  # a PIL image, a number: one input that is not a path
        inputs = [inputs]
    if bad := [p for p in inputs if not isinstance(p, (str, os.PathLike))]:
        got = type(bad[0]).__name__
        if hasattr(bad[0], "shape") or hasattr(bad[0], "getexif"):  # an array or a PIL image
            hint = (
                "; an image in memory: x = mx.array(aim_mlx.preprocess(image)[None]), then "
                "model(x) for logits or aim_mlx.embed.features(model, x, layers, pool)"
            )
        else:
            hint, got = "", f"{got} {bad[0]!r:.60}"
        raise TypeError(
            f"inputs: give paths as str or pathlib.Path (or a list of them), got {got}{hint}"
        )
    return [os.fspath(p) for p in inputs]


def check_model(model) -> None:
    """TypeError unless `model` is a loaded model (a name or folder is for `aim_mlx.load`)."""
    from .models import AIM

    if not isinstance(model, AIM):
        raise TypeError(
            f"model: give a loaded model, model = aim_mlx.load(...), got "
            f"{type(model).__name__} {model!r:.60}"
        )


def not_finite_error(model) -> str:
    """The error of an image whose output from `model` holds NaN or Inf, saying what to do."""
    what = "the model's output for this image is NaN or Inf"
    if model.activation_dtype() == mx.float16:
        return (
            f"{what}: float16 overflowed, or the weights hold NaN or Inf; load the model in "
            "dtype bfloat16 or float32 (--dtype), and if that gives NaN too, convert the "
            "checkpoint again"
        )
    return f"{what}: the model's weights may hold NaN or Inf; convert the checkpoint again"


def check_positive(name: str, value) -> int:
    """`value` if it is a positive whole number, else a ValueError naming `name`."""
    if not is_whole(value) or value < 1:
        raise OptionError(f"{name} must be a positive whole number, got {value!r}")
    return int(value)


def collect(inputs: Iterable[str | os.PathLike] | str | os.PathLike) -> list[Item]:
    """Files as given (whatever their suffix) and the images inside folders; a missing path, a
    folder without images and a folder that cannot be read become Items with an error."""
    items = []
    for given in as_inputs(inputs):
        if os.path.isdir(given):
            unreadable = []
            found = [(p, None) for p in walk_images(given, unreadable)]
            if not found and not unreadable:
                suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
                items.append(Item(given, f"folder has no images (looked for {suffixes})"))
            items += [Item(p, why) for p, why in sorted(found + unreadable, key=lambda f: f[0])]
        elif os.path.exists(given):
            items.append(Item(given))
        else:
            items.append(Item(given, "no such file or folder"))
    return items


def drop_repeats(items: list[Item]) -> tuple[list[Item], list[tuple[str, str]]]:
    """`items` with each folder entry once, the first, where inputs overlap (a file given beside
    its folder, one folder twice or also through a link to it); and (path, the path kept) for
    each one left out. An entry is its folder's real path and its name: two names of one file
    (a link, a hard link) stay two entries."""
    real, first, kept, repeats = {}, {}, [], []
    for item in items:
        folder, name = os.path.split(item.path)
        if folder not in real:  # once per folder: realpath looks at every part of it
            real[folder] = os.path.realpath(folder or ".")
        seen = first.setdefault((real[folder], name), item)
        if seen is item:
            kept.append(item)
        else:
            repeats.append((item.path, seen.path))
    return kept, repeats


def file_id(path: str) -> tuple[int, int] | str:
    """What is the same for every name of one file, links and hard links alike: its device and
    inode, or its real path where the file system has no inode numbers or it cannot be looked at
    (its error comes when it is read)."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return (st.st_dev, st.st_ino) if st.st_ino else os.path.realpath(path)


def one_name_per_file(
    pairs: list[tuple[str, int]], class_names, where: str, error: type[Exception]
) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """(image path, label) pairs with one name per file (`file_id`), the first, so that an image
    is counted once; and (path, the path kept) for each other name. A file in two classes, one
    image with two labels, is refused: `error` naming both (`where` first, then the paths and
    `class_names[label]`)."""
    first, kept, others = {}, [], []
    for i, (path, label) in enumerate(pairs):
        j = first.setdefault(file_id(path), i)
        if j == i:
            kept.append((path, label))
            continue
        other, other_label = pairs[j]
        if label != other_label:
            raise error(
                f"{where}: {other} and {path} are one file (a link) in two classes, "
                f"{class_names[other_label]!r} and {class_names[label]!r}; keep it in one class"
            )
        others.append((path, other))
    return kept, others


def errors(inputs: Iterable[str | os.PathLike]) -> list[tuple[str, str]]:
    """(path, reason) for every input that `collect` finds nothing to read in."""
    return [(it.path, it.error) for it in collect(inputs) if it.error]


def _load(path: str, size: int) -> np.ndarray | str:
    try:
        return preprocess(path, size)
    except ImageError as e:
        return str(e)


def _loaded_batches(items: list[Item], batch_size: int, size: int, pool) -> Iterator:
    """(items, arrays or error messages) per batch, decoding the next batch in the background."""
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]

    def submit(chunk):
        return [pool.submit(_load, it.path, size) for it in chunk if it.error is None]

    pending = submit(chunks[0]) if chunks else []
    for i, chunk in enumerate(chunks):
        current, pending = pending, submit(chunks[i + 1]) if i + 1 < len(chunks) else []
        yield chunk, [f.result() for f in current]


def run(
    fn: Callable[[mx.array], np.ndarray],
    items: list[Item],
    *,
    not_finite: str | None,
    size: int = 224,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "images",
    into: np.ndarray | None = None,
) -> Iterator[tuple[Item, np.ndarray | None]]:
    """Apply `fn` (a batch (B, 3, size, size) -> a numpy array with B rows) to every readable
    image; yield (item, its row) in input order, or (item with .error, None). A row holding
    NaN or Inf becomes the error `not_finite` (`not_finite_error`; None: rows are not checked).

    Under `mlx.launch` the items are shared out between the ranks and rank 0 alone yields them
    all (`distributed.map_images`; `into`: the array it gathers them in, whose rows it yields);
    without a launcher this is `run_here`."""
    from . import distributed

    return distributed.map_images(
        fn,
        items,
        not_finite=not_finite,
        size=size,
        batch_size=batch_size,
        progress=progress,
        desc=desc,
        into=into,
    )


def run_here(
    fn: Callable[[mx.array], np.ndarray],
    items: list[Item],
    *,
    not_finite: str | None = None,
    size: int = 224,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "images",
) -> Iterator[tuple[Item, np.ndarray | None]]:
    """`run` in this process alone."""
    workers = min(8, os.cpu_count() or 1)
    with (
        ThreadPoolExecutor(workers) as pool,
        tqdm(total=len(items), desc=desc, unit="img", disable=not progress or None) as bar,
    ):
        for chunk, loaded in _loaded_batches(items, batch_size, size, pool):
            ok = [it for it in chunk if it.error is None]
            for it, x in zip(ok, loaded, strict=True):
                if isinstance(x, str):
                    it.error = x
            arrays = [x for x in loaded if not isinstance(x, str)]
            rows = iter(_in_this_thread(fn, mx.array(np.stack(arrays))) if arrays else [])
            for it in chunk:
                row = None if it.error else next(rows)
                if not_finite and row is not None and not np.isfinite(row).all():
                    it.error, row = not_finite, None
                yield it, row
            bar.update(len(chunk))


def _in_this_thread(fn: Callable[[mx.array], np.ndarray], x: mx.array) -> np.ndarray:
    """fn(x), saying what to do where MLX cannot compute the model's lazy weights here."""
    try:
        return fn(x)
    except RuntimeError as e:  # MLX computes a lazy array only in the thread that made it
        if "in current thread" not in str(e):
            raise
        raise RuntimeError(
            f"{e} The model's weights are read lazily, in the thread that loaded it: to use "
            "the model in other threads, run mx.eval(model.parameters()) after aim_mlx.load"
        ) from None
