"""From what the user names (`aim-1B`, a converted folder, a folder of PyTorch checkpoints) to a
converted MLX model folder, downloading and converting into the cache on first use.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx

from . import cache, hub, memory, registry
from .checks import is_path
from .constants import DTYPE_NAMES, ITEMSIZE, as_dtype_name
from .convert.converter import (
    Q_GROUP_SIZE_DEFAULT,
    ConversionError,
    WriteError,
    check_quantize_options,
)
from .errors import OptionError
from .loader import ModelLoadError, model_args, read_config
from .models import PRESETS, ModelArgs, last_probe_layers


class ModelNotFoundError(ModelLoadError):
    """Neither a known model name nor a usable folder."""


def default_dtype() -> str:
    """float16 on a GPU (Metal, CUDA); float32 on the CPU, where half precision is much slower
    (README.md, "Performance")."""
    on_gpu = mx.default_device() == mx.gpu
    return "float16" if on_gpu else "float32"


def dtype_name(dtype: str | mx.Dtype | None) -> str | None:
    """A weight dtype's name ("float16") from its name or its mx.Dtype (mx.float16)."""
    dtype = as_dtype_name(dtype)
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise OptionError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    return dtype


def say(message: str, progress: bool = True) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def resolve(
    model: str | Path,
    head: str | None = None,
    dtype: str | None = None,
    *,
    quantize_bits: int | None = None,
    q_group_size: int = Q_GROUP_SIZE_DEFAULT,
    keep_downloads: bool = True,
    progress: bool = True,
    endpoint: str | None = None,
    hf_cache_dir: str | Path | None = None,
) -> Path:
    """The converted MLX folder for a model name or path, converting it into the cache if needed.

    `model`: a registered name (`aim-600M`, `aim-1B`, `aim-3B`, `aim-7B`, or one added to the
    registry), a converted folder, or a folder of PyTorch checkpoints (the official
    `*_backbone.pth` + `*_head_{best,last}_layers.pth` files, or a hub folder with `config.json`
    and `pytorch_model.bin`). `head` "best" or "last" picks an official head (and with it the
    probe layers); None takes a converted folder's own head, else the best one. A converted
    folder that does not hold the head asked for is an error. `dtype` None picks
    `default_dtype()`.
    """
    check_model_ref(model)
    if head is not None and head not in registry.HEADS:
        raise OptionError(
            f"head (--head) must be one of {', '.join(registry.HEADS)} (or left out), got {head!r}"
        )
    dtype = dtype_name(dtype) or default_dtype()
    quant = _quantization(quantize_bits, q_group_size)
    options = dict(head=head, dtype=dtype, quant=quant, progress=progress)

    if registry.is_known(str(model)):
        spec = registry.get(str(model))
        hub_options = dict(endpoint=endpoint, hf_cache_dir=hf_cache_dir, keep=keep_downloads)
        return _from_hub(spec, **{**options, "head": head or "best"}, **hub_options)
    path = Path(model).expanduser()
    if not path.exists():
        known = ", ".join(registry.all_models())
        raise ModelNotFoundError(
            f"{model!r} is neither a known model ({known}) nor an existing folder"
        )
    if is_converted(path):
        if quant:
            raise ModelLoadError(
                f"{path} is already converted; quantization applies when converting "
                "(`aim-mlx convert -q`, or quantize_bits (-q) with a model name or checkpoint "
                "folder)"
            )
        if head is not None:
            _check_head(path, head)
        return path  # the loader checks its format version
    return _from_checkpoints(path, **options)


def _quantization(bits: int | None, group_size: int) -> dict | None:
    """`resolve`'s quantize_bits (-q) and q_group_size, checked, as {"bits", "group_size"};
    None without quantize_bits."""
    if not bits:
        return None
    try:
        bits, group = check_quantize_options(bits, group_size, "quantize_bits")
    except ConversionError as e:
        raise OptionError(str(e)) from None
    return {"bits": bits, "group_size": group}


def load(model: str | Path, head: str | None = None, dtype: str | None = None, **kwargs):
    """An AIM model, ready to call: `load("aim-600M")`, `load("path/to/folder")`.

    Accepts what `resolve` accepts; downloads and converts on first use. `head` may also be a
    trained head's folder (`aim-mlx probe train`); the keywords best / last win over a folder
    of that name (give it as ./best).
    """
    from .probe.head import is_head_folder, load_with_head

    dtype = dtype_name(dtype)
    if is_head_folder(head):
        return load_with_head(model, head, dtype, **kwargs)

    check_memory(model, dtype, kwargs.get("quantize_bits"))
    _, net = load_resolved(model, head, dtype, **kwargs)
    if dtype and not kwargs.get("quantize_bits") and net.dtype != getattr(mx, dtype):
        net.set_dtype(getattr(mx, dtype))  # a converted folder stored in another dtype
    return net


def load_resolved(model, head, dtype, **kwargs) -> tuple[Path, object]:
    """`resolve`, then `load_model`: the folder and the model. A cache entry removed in between
    (`aim-mlx cache rm` in another process) is made again, once."""
    from .loader import load_model

    folder = resolve(model, head, dtype, **kwargs)
    try:
        return folder, load_model(folder)
    except ModelLoadError:
        if folder == Path(model).expanduser() or cache.is_current(folder):
            raise  # the user's own folder, or a damaged entry: the error says what to do
    folder = resolve(model, head, dtype, **kwargs)
    return folder, load_model(folder)


def check_model_ref(model) -> None:
    """OptionError unless `model` can name a model: a non-empty str or path."""
    if not is_path(model):  # str(None) would look up "None"; "" (`-m "$MODEL"`, MODEL unset)
        known = ", ".join(registry.all_models())
        raise OptionError(f"model must be a model name ({known}) or a folder, got {model!r}")


def known_num_blocks(model: str | Path) -> int | None:
    """The number of blocks of a registered model or a converted folder, read without loading
    (or downloading) it; None for anything else."""
    args = known_args(model)
    return args.num_blocks if args else None


def known_args(model: str | Path) -> ModelArgs | None:
    """The architecture of a registered model (with one of its heads' probe layers) or of a
    converted folder, read without loading (or downloading) it; None for anything else."""
    if registry.is_known(str(model)):
        spec = registry.get(str(model))
        return spec.model_args(next(iter(spec.heads)))
    path = Path(model).expanduser()
    if path.is_dir() and is_converted(path):
        return model_args(path, read_config(path))
    return None


def check_img_size(model: str | Path, img_size: int | None) -> None:
    """OptionError for an `img_size` that a registered model or a converted folder cannot take,
    read without loading (or downloading) it; other models' is checked once they are loaded."""
    from . import images

    if img_size is not None and (args := known_args(model)):
        images.input_size(SimpleNamespace(args=args), img_size)


def check_memory(model: str | Path, dtype: str | None, quantize_bits: int | None) -> None:
    """For a registered model: refuse, before any download or conversion, weights that cannot
    fit in the device's memory (`memory.check_fits`; the loader checks every folder again)."""
    dtype = dtype or default_dtype()
    if not registry.is_known(str(model)) or dtype not in DTYPE_NAMES:
        return  # a folder (the loader checks its files) or a dtype that resolve refuses
    spec = registry.get(str(model))
    memory.check_model(spec.name, spec.param_count(), dtype, quantize_bits)


def _convert_into_cache(
    key: str,
    progress: bool,
    make_sources,
    expected: dict | None = None,
    hub_model: str | None = None,
    hub_cache_dir: str | Path | None = None,
    **convert_kwargs,
) -> Path:
    """Convert once into the cache entry `key`; concurrent callers wait and reuse the result.
    `expected`: what the entry must have been made from (`cache.is_current`'s files, args);
    `hub_model`: the registered model whose downloads (in `hub_cache_dir`) `make_sources`
    returns."""
    from .convert import convert

    out = cache.entry_dir(key)
    expected = expected or {}
    if cache.is_current(out, **expected):
        return out
    busy = f"making {out}" + (f" or removing {hub_model}'s downloads" if hub_model else "")
    with cache.lock(
        key,
        on_wait=lambda: say(f"waiting for another process {busy}", progress),
        readers=hub.readers_folder(hub_model, hub_cache_dir) if hub_model else None,
    ):
        if cache.is_current(out, **expected):  # another process converted it while we waited
            return out
        if version := cache.made_by_newer(out):
            raise ModelLoadError(
                f"{out}: made by a newer aim-mlx (format version {version}); upgrade aim-mlx, "
                f"use a cache of this version's own (AIM_MLX_CACHE), or remove the entry "
                f"(`aim-mlx cache rm {out.name}`) to convert it again with this one"
            )
        sources = make_sources()
        say(f"converting to {convert_kwargs['dtype']} into {out}", progress)
        if out.is_dir() and not out.is_symlink():  # stale or damaged: under the lock, unread
            shutil.rmtree(out)
        elif out.exists() or out.is_symlink():  # a link (to a folder elsewhere) or a file
            out.unlink()
        convert(out, **sources, **convert_kwargs, progress=progress, into_cache=True)
    return out


def _from_hub(spec, head, dtype, quant, progress, endpoint, hf_cache_dir, keep) -> Path:
    key = cache.entry_key(spec.name, head, dtype, quant)

    def download() -> dict:
        converted_bytes = converted_size(spec.param_count(), dtype, quant)
        backbone, head_file = hub.download(
            spec,
            head,
            cache_dir=hf_cache_dir,
            endpoint=endpoint,
            also_needed={cache.cache_root(): converted_bytes},
            progress=progress,
        )
        return dict(backbone=backbone, head=head_file)

    settings = spec.cache_settings(head)
    out = _convert_into_cache(
        key,
        progress,
        download,
        dict(files=spec.files(head), settings=settings),  # a changed registry entry: again
        hub_model=spec.name,
        hub_cache_dir=hf_cache_dir,
        **settings,
        dtype=dtype,
        name=spec.name,
        verified=True,  # hub.download checked each file's SHA-256
        **_quant_kwargs(quant),
    )
    if not keep:
        freed = hub.remove_downloads(spec, hf_cache_dir, progress)
        if freed:
            say(f"removed {hub.human(freed)} of downloaded checkpoints", progress)
    return out


def converted_size(params: int, dtype: str, quant: dict | None) -> int:
    """About the size of a converted model of `params` weights: in `dtype`, or quantized
    (packed weights, and a scale and a bias in `dtype` per group)."""
    if not quant:
        return params * ITEMSIZE[dtype]
    return int(params * (quant["bits"] / 8 + 2 * ITEMSIZE[dtype] / quant["group_size"]))


def _quant_kwargs(quant: dict | None) -> dict:
    if not quant:
        return {}
    return dict(quantize=True, q_bits=quant["bits"], q_group_size=quant["group_size"])


def is_converted(path: Path) -> bool:
    """A folder with a config.json and no checkpoints beside it: the loader reports what is
    wrong with it (rather than calling it a folder of checkpoints without checkpoints)."""
    if not (path / "config.json").is_file() or (path / "pytorch_model.bin").is_file():
        return False
    return not any(path.glob("*.pth"))


def folder_head(config: dict) -> str | None:
    """Which official head a converted folder holds, from its probe layers: "last" (the last
    six blocks), "best" (the best layers of its size; any other head of a size without a
    preset), or None (other layers of an official size)."""
    layers, blocks = tuple(config.get("probe_layers", ())), config.get("num_blocks", 0)
    if layers == last_probe_layers(blocks):
        return "last"
    for preset in PRESETS.values():
        if (preset["embed_dim"], preset["num_blocks"]) == (config.get("embed_dim"), blocks):
            return "best" if layers == tuple(preset["best"]) else None
    return "best"


def _check_head(path: Path, head: str) -> None:
    config = read_config(path)
    model_args(path, config)  # a config that cannot be read as a model is reported as such
    held = folder_head(config)
    if held != head:
        raise ModelLoadError(
            f"{path} is converted with {f'the {held}' if held else 'a custom'} head (probe "
            f"layers {list(config.get('probe_layers', []))}), not the {head} one: leave out "
            f"head (--head) to use it, or pass a model name or checkpoint folder with the "
            f"{head} head"
        )


def checkpoint_head(folder: Path, head: str | None) -> str:
    """The head to take from a folder of checkpoints: as asked, else best, else the only one."""
    if head is None:
        only_last = not any(folder.glob("*head_best*.pth")) and any(folder.glob("*head_last*.pth"))
        head = "last" if only_last else "best"
    return head


def find_checkpoints(folder: Path, head: str) -> dict:
    """The converter's source arguments for a folder of PyTorch checkpoints."""
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder} is not a folder of checkpoints or a converted model")
    if (folder / "config.json").is_file() and (folder / "pytorch_model.bin").is_file():
        if head != "best":
            raise ModelNotFoundError(
                f"{folder} is a hub-style folder holding only the best-layers head; use "
                "head 'best' (--head best)"
            )
        return dict(hf_path=folder)
    backbones = sorted(folder.glob("*backbone*.pth"))
    heads = sorted(folder.glob(f"*head_{head}*.pth"))
    if not backbones and not heads:
        raise ModelNotFoundError(
            f"{folder}: no config.json and no checkpoints: neither a converted aim-mlx folder "
            f"nor a folder of PyTorch checkpoints (*backbone*.pth + *head_{head}*.pth, or "
            "config.json + pytorch_model.bin)"
        )
    if len(backbones) != 1 or len(heads) != 1:
        raise ModelNotFoundError(
            f"{folder}: expected one *backbone*.pth and one *head_{head}*.pth file (or a hub-style "
            f"config.json + pytorch_model.bin), found {len(backbones)} backbone and "
            f"{len(heads)} head files"
        )
    return dict(backbone=backbones[0], head=heads[0])


def _source_files(sources: dict) -> list[Path]:
    """The checkpoint files, a hub-style folder's files among them (not folders in it, such as
    an AIM_MLX_CACHE placed there)."""
    paths = sorted(Path(p) for p in sources.values())
    return [f for p in paths for f in ([p] if p.is_file() else sorted(p.iterdir())) if f.is_file()]


def _fingerprint(folder: Path, sources: dict) -> str:
    h = hashlib.sha256(str(folder.resolve()).encode())
    for f in _source_files(sources):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:10]


def _named_spec(sources: dict, head: str):
    """The registered model whose backbone file name the folder's backbone carries, or None."""
    name = Path(sources.get("backbone", "")).name
    specs = registry.all_models().values()
    return next((s for s in specs if s.backbone.filename == name and head in s.heads), None)


def _official_match(sources: dict, head: str) -> dict:
    """Architecture options when the files carry an official name, else none (the converter
    then reads what it can from the tensors and the folder's config.json)."""
    if spec := _named_spec(sources, head):
        args = spec.model_args(head)
        return dict(probe_layers=list(args.probe_layers), num_heads=args.num_heads)
    return {}


def _check_named_weights(sources: dict, head: str) -> None:
    """ConversionError if the backbone carries a registered model's file name but not its
    shapes: that model's head count and probe layers would be used on other weights (aim-3B's
    under aim-600M's names made a 12-head model of a 24-head one)."""
    if not (spec := _named_spec(sources, head)):
        return
    from .convert.checkpoint import CheckpointError, open_checkpoint
    from .convert.converter import trunk_shape

    backbone = Path(sources["backbone"])
    try:
        checkpoint = open_checkpoint(backbone)  # the pickle only: shapes, no weights
    except CheckpointError as e:  # damaged: the ConversionError the converter gives
        raise ConversionError(str(e)) from None
    try:
        found = trunk_shape(dict.fromkeys(checkpoint.keys(), checkpoint), [backbone])
    finally:
        checkpoint.close()
    width, blocks = found["embed_dim"], found["num_blocks"]
    want = (spec.arch["embed_dim"], spec.arch["num_blocks"])
    if (width, blocks) != want:
        raise ConversionError(
            f"{backbone.name} is {spec.name}'s file name, but its weights are "
            f"not {spec.name}'s (embed_dim {width}, {blocks} blocks; {spec.name} has {want[0]} "
            f"and {want[1]}); if they are another model's, rename the files"
        )


def _from_checkpoints(folder: Path, head, dtype, quant, progress) -> Path:
    head = checkpoint_head(folder, head)
    sources = find_checkpoints(folder, head)
    stem = cache.safe_name(folder.resolve().name)
    key = cache.entry_key(f"local-{stem}-{_fingerprint(folder, sources)}", head, dtype, quant)

    def checked_sources() -> dict:
        _check_named_weights(sources, head)
        float32_bytes = sum(f.stat().st_size for f in _source_files(sources))
        needs = converted_size(float32_bytes // 4, dtype, quant)
        hub.check_disk_space({cache.cache_root(): needs}, str(folder))
        return sources

    try:
        return _convert_into_cache(
            key,
            progress,
            checked_sources,
            dtype=dtype,
            name=folder.resolve().name,
            **_official_match(sources, head),
            **_quant_kwargs(quant),
        )
    except WriteError:  # the cache's disk, not the checkpoints: converting by hand won't help
        raise
    except ConversionError as e:
        raise ConversionError(
            f"{folder}: {e}. Convert it with `aim-mlx convert` and the options it needs "
            "(--out DIR), then pass that folder as the model."
        ) from None


def models_overview(hf_cache_dir: str | Path | None = None) -> list[dict]:
    """Every known model with its parameters, published accuracy, files and what is cached."""
    entries = cache.list_entries()
    rows = []
    for spec in registry.all_models().values():
        est_backbone, est_head = registry.estimated_sizes(spec)
        files = []
        for role, file in [("backbone", spec.backbone), *spec.heads.items()]:
            local = hub.cached_path(spec, file, hf_cache_dir)
            size = cache.file_size(local) if local else None
            if size is None:  # not downloaded, or removed meanwhile (rm-downloads elsewhere)
                local, size = None, file.size
            files.append(
                dict(
                    role=role,
                    filename=file.filename,
                    sha256=file.sha256,
                    size=size or (est_backbone if role == "backbone" else est_head),
                    size_exact=bool(size),
                    downloaded=local is not None,
                )
            )
        converted = [e.row() for e in entries if e.key.lower().startswith(spec.name.lower() + "--")]
        rows.append(
            dict(
                name=spec.name,
                repo=spec.repo,
                params=spec.param_count(),
                top1=spec.top1,
                probe_layers={h: list(v) for h, v in spec.probe_layers.items()},
                files=files,
                converted=converted,
            )
        )
    return rows
