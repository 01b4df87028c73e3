"""Image features: the head's averaged probe layers, the last block or chosen blocks."""

from __future__ import annotations

import json
import numbers
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from safetensors import SafetensorError

from . import distributed, images, memory
from .errors import OptionError, OutputError
from .output import (
    folder_lock,
    keep_aside,
    place_file,
    prepare_output,
    remove_leftovers,
    signals_held,
    temp_path,
    write_failure,
)

POOLS = ("mean", "tokens")
SUFFIXES = (".safetensors", ".npy")
# safetensors refuses a header (tensor list and metadata, as JSON) past 100 MB; the image paths
# go in its metadata, so a very large image set fits only in a .npy and its listing.
SAFETENSORS_HEADER_MAX = 100_000_000


def parse_layers(layers: str | Iterable[int], num_blocks: int) -> str | tuple[int, ...]:
    """Either "head", "last", or block indices ("3,5,-1" or a list; negative from the end)."""
    if isinstance(layers, str) and layers in ("head", "last"):
        return layers
    if isinstance(layers, numbers.Integral):
        layers = [layers]  # one block
    try:
        parts = layers.split(",") if isinstance(layers, str) else list(layers)
        if any(isinstance(i, bool) or not isinstance(i, str | numbers.Integral) for i in parts):
            raise ValueError  # 1.5 or True: not a block number, not rounded to one
        blocks = tuple(int(i) for i in parts)
    except (ValueError, TypeError):
        raise OptionError(
            f"layers must be head, last or block numbers like 3,5,7; got {layers!r}"
        ) from None
    if not blocks:
        raise OptionError(f"layers must name at least one block; got {layers!r}")
    bad = [i for i in blocks if not -num_blocks <= i < num_blocks]
    if bad:
        raise OptionError(
            f"blocks {bad} do not exist: the model has {num_blocks} blocks, 0..{num_blocks - 1} "
            f"(or -{num_blocks}..-1 counted from the end)"
        )
    return tuple(i % num_blocks for i in blocks)


def check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise OptionError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    return pool


def features(model, x: mx.array, layers: str | Iterable[int], pool: str) -> np.ndarray:
    """x (B, 3, H, W) -> float32 features:
    head / last: (B, D) pooled, (B, N, D) tokens; blocks: (B, L, D) pooled, (B, L, N, D) tokens.
    `layers` and `pool` as `embed` takes them (blocks counted from the end too: -1 the last)."""
    return _features(model, x, parse_layers(layers, model.args.num_blocks), check_pool(pool))


def _features(model, x: mx.array, layers: str | tuple[int, ...], pool: str) -> np.ndarray:
    """`features` of checked `layers` and `pool` (`embed` checks them once, not per batch)."""
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
    # (path, the path it repeats): files that overlapping inputs listed again, embedded once
    repeats: list[tuple[str, str]] = field(default_factory=list)


def embed(
    model,
    inputs: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    layers: str | Iterable[int] = "head",
    pool: str = "mean",
    batch_size: int = 8,
    progress: bool = False,
    img_size: int | None = None,
) -> Embeddings:
    """Features of image files and folders (searched recursively, sorted); `img_size`: the
    input size, a multiple of the patch size (default: the model's). A file that overlapping
    inputs list twice (`embed d d/x.jpg`) has one row, under its first path (`repeats`)."""
    images.check_model(model)
    check_pool(pool)
    layers = parse_layers(layers, model.args.num_blocks)
    images.check_positive("batch_size (--batch-size)", batch_size)
    size = images.input_size(model, img_size)
    items, repeats = images.drop_repeats(images.collect(inputs))
    shape = feature_shape(model.args, layers, pool, size)
    # every row goes straight into one array (rows kept apart, then stacked, took twice the
    # output's memory at the end), which must fit: refused before any image is read
    memory.check_features_fit(sum(1 for it in items if not it.error), shape)
    out = np.empty((len(items), *shape), np.float32)
    paths, errors = [], []
    for item, row in images.run(
        lambda x: _features(model, x, layers, pool),
        items,
        not_finite=images.not_finite_error(model),
        size=size,
        batch_size=batch_size,
        progress=progress,
        desc="embed",
        into=out,  # under mlx.launch rank 0 gathers the rows there: held once
    ):
        if item.error:
            errors.append((item.path, item.error))
        else:
            if not np.may_share_memory(row, out):  # gathered there already
                out[len(paths)] = row
            paths.append(item.path)
    # no readable image: no rows, in the shape `features` gives (they concatenate with others)
    return Embeddings(out[: len(paths)], paths, errors, repeats)


def feature_shape(args, layers: str | tuple[int, ...], pool: str, size: int) -> tuple[int, ...]:
    """One image's feature shape from `features`: ([L,] [N,] D)."""
    tokens = (size // args.patch_size) ** 2
    shape = (args.embed_dim,) if pool == "mean" else (tokens, args.embed_dim)
    return shape if layers in ("head", "last") else (len(layers), *shape)


def listing_path(out: str | Path) -> Path:
    """Where `save` writes the image order next to a `.npy` file."""
    out = Path(out)
    return out.with_name(out.name + ".paths.txt")


def read_listing(path: str | Path) -> list[str]:
    """The image paths of a `.npy.paths.txt` listing, exactly as `save` was given them."""
    return [json.loads(line) for line in Path(path).read_text(encoding="ascii").splitlines()]


def save(
    out: str | Path,
    emb: Embeddings,
    metadata: dict | None = None,
    listing: Path | None = None,
    replace: bool = True,
    on_wait: Callable[[], None] | None = None,
) -> list[Path]:
    """Write `.safetensors` (tensor `features`, the paths as JSON in metadata key `paths`) or
    `.npy` plus `<out>.paths.txt` (one line per row, each a JSON string, so that any file name
    round-trips; see `read_listing`). Written whole or not at all, with the usual file mode.
    `replace=False`: a file already there, even one made while this ran, is kept: OutputError.
    A .npy and its listing are moved into place holding a lock on the .npy's folder, so that
    two runs to one output leave one run's pair; `on_wait()` if another run holds it."""
    out = check_suffix(out)
    if out.suffix == ".safetensors":
        from safetensors.numpy import save_file

        meta = {k: str(v) for k, v in (metadata or {}).items() if v is not None}
        meta["paths"] = json.dumps(emb.paths)
        check_safetensors_header(emb.paths, len(json.dumps(meta)))
        # safetensors writes an array's memory as it lies: a strided view (a transpose, a
        # slice with a step) was written as the wrong numbers, silently
        features = np.ascontiguousarray(emb.features)
        _write_all(
            {out: lambda tmp: save_file({"features": features}, str(tmp), metadata=meta)},
            replace,
        )
        return [out]
    listing = listing or listing_path(out)  # `out` may be a link's target: the CLI says where
    text = "".join(json.dumps(p) + "\n" for p in emb.paths)  # ASCII: escapes what is not
    _write_all(
        {
            out: lambda tmp: np.save(tmp, emb.features, allow_pickle=False),
            listing: lambda tmp: tmp.write_text(text, encoding="ascii"),
        },
        replace,
        on_wait,
    )
    return [out, listing]


@dataclass
class EmbedFileResult:
    """What `embed_to_file` wrote."""

    files: list[Path]  # as `out` was given: it, and a .npy's listing; none if no image was read
    shape: tuple[int, ...]  # of the features written: one row per image
    errors: list[tuple[str, str]]  # (path, reason): images left out
    repeats: list[tuple[str, str]]  # (path, the path it repeats): files embedded once


def embed_to_file(
    model: str | os.PathLike,
    inputs: Iterable[str | os.PathLike] | str | os.PathLike,
    out: str | os.PathLike,
    *,
    head: str | None = None,
    dtype: str | None = None,
    quantize_bits: int | None = None,
    layers: str | Iterable[int] = "head",
    pool: str = "mean",
    batch_size: int = 8,
    img_size: int | None = None,
    force: bool = False,
    progress: bool = False,
    on_wait: Callable[[Path], None] | None = None,
) -> EmbedFileResult | None:
    """`embed` the images with the model that `aim_mlx.load(model, head, dtype, quantize_bits=)`
    gives, and `save` the features to `out` (.safetensors, or .npy and its listing), the model
    and options in the metadata.

    Checked before the model is loaded (perhaps downloaded): the options, the output and its
    listing (an existing one is refused unless `force`; missing folders are created), that the
    features fit in memory and their paths in a .safetensors header. Inputs holding no image at
    all: no model is loaded, nothing written (`files` empty). `on_wait(folder)` if another run
    is writing a .npy pair there (this one waits). Under `mlx.launch` every rank embeds its
    share; rank 0 writes and returns the result, the other ranks return None.
    """
    from .resolve import check_img_size, check_model_ref, known_num_blocks, load

    check_model_ref(model)
    inputs = images.as_inputs(inputs)  # one path, or several
    check_suffix(out)
    check_pool(pool)
    images.check_positive("batch_size (--batch-size)", batch_size)
    if isinstance(layers, Iterator):  # a generator: a list, for the checks and embed to read
        layers = list(layers)
    parse_layers(layers, known_num_blocks(model) or 10**9)  # unknown blocks: the syntax
    check_img_size(model, img_size)
    options = dict(layers=layers, pool=pool, img_size=img_size)
    target, listing = distributed.on_root(
        lambda: _prepare_outputs(out, model, head, inputs, force, **options)
    ) or (None, None)
    # under mlx.launch: a rank that finds no image still runs, and the ranks compare inputs
    if distributed.on_any(images.any_image(inputs)):
        net = load(model, head, dtype, quantize_bits=quantize_bits, progress=progress)
        emb = embed(net, inputs, batch_size=batch_size, progress=progress, **options)
    else:  # every input missing or an empty folder: said without loading (downloading) a model
        emb = Embeddings(np.zeros((0,), np.float32), [], images.errors(inputs))
    if not distributed.is_root():  # under mlx.launch: rank 0 writes every rank's rows
        return None
    files = []
    if emb.paths:
        meta = dict(model=model, head=head, layers=layers, pool=pool, img_size=img_size)
        wait = on_wait and (lambda: on_wait(target.parent))
        save(target, emb, meta, listing, replace=force, on_wait=wait)
        files = [Path(out), listing_path(out)] if listing else [Path(out)]
    return EmbedFileResult(files, emb.features.shape, emb.errors, emb.repeats)


def _prepare_outputs(out, model, head, inputs, force, *, layers, pool, img_size):
    """`embed_to_file`'s checks of its output, before any work: (where to write the features,
    where their listing or None), links resolved."""
    from .resolve import known_args

    npy = Path(out).suffix == ".npy"
    args = known_args(model)
    needed = args or not npy  # the walk of the inputs, where it is used
    items = images.drop_repeats(images.collect(inputs))[0] if needed else []
    found = [it.path for it in items if not it.error]
    if args:  # the features, held in memory until written, fit there
        size = img_size or args.img_size
        shape = feature_shape(args, parse_layers(layers, args.num_blocks), pool, size)
        memory.check_features_fit(len(found), shape)
    if npy:  # a killed run's partial listing, even where a check below fails
        remove_leftovers(Path(os.path.realpath(listing_path(Path(out).expanduser()))))
    target = prepare_output(out, force=force, inputs=[model, head])  # a link: its target
    listing = None  # beside the .npy as the user named it, where they will look for it
    if npy:
        listing = prepare_output(listing_path(out), force=force, inputs=[model, head])
    else:  # every path that may be written fits in the metadata
        check_safetensors_header(found)
    return target, listing


def check_suffix(out: str | Path) -> Path:
    """`out` as a Path, if it ends in .safetensors or .npy (".npy" alone is a name without a
    suffix); else OptionError."""
    out = Path(out)
    if out.suffix not in SUFFIXES:
        raise OptionError(f"{out}: the output must end in .safetensors or .npy")
    return out


def check_safetensors_header(paths: list[str], size: int | None = None) -> None:
    """OutputError if the paths (or a header of `size` bytes) pass safetensors' header limit;
    the CLI asks before any work, with every path it may write."""
    size = size or len(json.dumps({"paths": json.dumps(paths)}))
    if size + 1000 > SAFETENSORS_HEADER_MAX:  # 1000: the tensor's entry and the other keys
        raise OutputError(
            f"the paths of {len(paths)} images take {size / 1e6:.0f} MB as .safetensors "
            f"metadata, past its limit of {SAFETENSORS_HEADER_MAX // 10**6} MB: write a .npy "
            "instead (the paths go to FILE.npy.paths.txt)"
        )


def _write_all(writers: dict, replace: bool = True, on_wait=None) -> None:
    """Write each {path: write(tmp_path)} to a temporary file, then move all of them into place;
    on failure the paths are as before (the old files put back, new ones removed). Without
    `replace`, a path that exists by then (another process's) is kept: OutputError. Several
    files are moved, and put back, holding the first one's `folder_lock`."""
    tmps = {p: temp_path(p, keep_suffix=True) for p in writers}
    olds, moved, current = {}, [], None
    publishing = ExitStack()  # the lock, from the first rename to the last put back
    try:
        for current, write in writers.items():
            mode = _new_file_mode(tmps[current])
            write(tmps[current])  # np.save keeps the .npy suffix of the temporary name
            os.chmod(tmps[current], mode)
        if len(tmps) > 1:  # another run's files never mixed with these
            publishing.enter_context(folder_lock(next(iter(tmps)).parent, on_wait))
        with signals_held():  # Ctrl-C cannot split the pair; after a SIGKILL here a listing
            if replace and len(tmps) > 1:  # is missing rather than another run's. The old
                for current in tmps:  # pair is kept, to be put back (one file: os.replace keeps it)
                    olds[current] = keep_aside(current)
                for current in list(tmps)[1:]:
                    current.unlink(missing_ok=True)
            for current, tmp in tmps.items():
                place_file(tmp, current, replace)
                moved.append(current)
    except BaseException as e:
        if len(moved) < len(tmps):  # not all of them in place: none, the old ones back
            with signals_held():  # a Ctrl-C midway would lose them (their names go below)
                for path in moved:
                    path.unlink(missing_ok=True)
                for path, old in list(olds.items()):
                    try:
                        if old is not None:
                            os.replace(old, path)
                    except OSError:  # kept under its old name rather than deleted
                        del olds[path]
        if isinstance(e, OSError | SafetensorError) and not isinstance(e, OutputError):
            reason = write_failure(e) if isinstance(e, OSError) else e  # disk full, I/O error
            raise OutputError(f"cannot write {current}: {reason}") from None
        raise
    finally:
        for tmp in [*tmps.values(), *olds.values()]:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        publishing.close()


def _new_file_mode(path: Path) -> int:
    """The mode a new file gets (0o666 less the umask), read from `path` created empty: some
    writers create 0o600 files. (`os.umask` reads the umask only by setting it, for the whole
    process: a file another thread created meanwhile got 0o666.)"""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return stat.S_IMODE(os.stat(path).st_mode)
