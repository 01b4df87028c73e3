"""Load a converted MLX model folder (config.json + safetensors)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from safetensors import SafetensorError, safe_open

from .constants import DTYPE_NAMES, MX_DTYPES
from .convert.converter import FORMAT_VERSION, Q_BITS, Q_GROUP_SIZES, architecture_metadata
from .errors import AimMlxError
from .memory import check_fits
from .models import AIM, ModelArgs, ops

INDEX = "model.safetensors.index.json"


class ModelLoadError(AimMlxError, ValueError):
    """A model folder that cannot be loaded; the message says why."""


def read_config(path: str | Path) -> dict:
    """The config.json of a model folder as a dict.

    Raises ModelLoadError when the file is missing, unreadable or not a JSON object.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"{path}: no config.json; not a converted aim-mlx folder (convert checkpoints "
            "with `aim-mlx convert`)"
        )
    try:
        config = json.loads(config_file.read_text())
    except OSError as e:
        raise ModelLoadError(f"{config_file}: cannot be read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise ModelLoadError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    return config


def check_format(path: str | Path, config: dict) -> None:
    """Raise ModelLoadError unless `config` was written by this converter format version."""
    if config.get("format") == "aim-mlx-trained-head":  # probe.head.HEAD_FORMAT
        raise ModelLoadError(
            f"{path} is a trained head's folder, not a model: pass it as head (--head), with the "
            "model it was trained on as model (-m/--model)"
        )
    version = config.get("format_version")
    if type(version) is int and version > FORMAT_VERSION:  # "convert again" would not help
        raise ModelLoadError(
            f"{path}/config.json: format version {version}, written by a newer aim-mlx; this "
            f"one reads {FORMAT_VERSION}: upgrade aim-mlx, or convert the checkpoints again "
            "with this one (`aim-mlx convert`)"
        )
    if type(version) is not int or version != FORMAT_VERSION:  # "1", 1.0 or true: not written
        what = f"format version {version!r}" if version is not None else "no format_version"
        raise ModelLoadError(
            f"{path}/config.json: {what}, this aim-mlx reads {FORMAT_VERSION}; "
            "convert the checkpoints again (`aim-mlx convert`)"
        )


def model_args(path: str | Path, config: dict) -> ModelArgs:
    """The architecture in a converted folder's config, its dtype and quantization checked:
    ModelLoadError naming the file and the field."""
    try:
        args = ModelArgs.from_dict(config)
        if config.get("dtype") not in DTYPE_NAMES:
            raise ValueError(
                f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {config.get('dtype')!r}"
            )
        check_quantization(config.get("quantization"))
    except ValueError as e:
        raise ModelLoadError(f"{path}/config.json: {e}") from None
    return args


def check_quantization(q) -> None:
    """None, or the converter's block: bits, group size, mode, the quantized layers."""
    if q is None:
        return
    if not isinstance(q, dict):
        raise ValueError(f"quantization must be null or an object, got {q!r}")
    # type int: 8.0 or true passed `in`, then failed inside MLX's quantize with a TypeError
    if type(q.get("bits")) is not int or q["bits"] not in Q_BITS:
        raise ValueError(f"quantization bits must be 4 or 8, got {q.get('bits')!r}")
    if type(q.get("group_size")) is not int or q["group_size"] not in Q_GROUP_SIZES:
        raise ValueError(
            f"quantization group_size must be one of {', '.join(map(str, Q_GROUP_SIZES))}, "
            f"got {q.get('group_size')!r}"
        )
    if q.get("mode", "affine") != "affine":
        raise ValueError(f"quantization mode must be affine, got {q.get('mode')!r}")
    layers = q.get("layers")
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise ValueError(f"quantization layers must be a list of layer names, got {layers!r}")


def weight_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards that model.safetensors.index.json lists."""
    index = path / INDEX
    if not index.is_file():
        if not (path / "model.safetensors").is_file():
            raise ModelLoadError(f"{path}: no model.safetensors (nor {INDEX}) weights")
        return [path / "model.safetensors"]
    try:
        listing = json.loads(index.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ModelLoadError(
            f"{index}: cannot read the shard list ({e}); {convert_again(path)}"
        ) from None
    shards = listing.get("weight_map") if isinstance(listing, dict) else None
    if not isinstance(shards, dict) or not all(isinstance(n, str) for n in shards.values()):
        raise ModelLoadError(  # was Python's own words: 'PosixPath' / 'int', 'weight_map'...
            f'{index}: expected a "weight_map" object from tensor names to shard file names; '
            f"{convert_again(path)}"
        )
    names = sorted(set(shards.values()))
    files = [path / name for name in names]
    if outside := next((n for n in names if Path(n).name != n or n in ("", ".", "..")), None):
        raise ModelLoadError(  # a shard is a file of the folder, never one elsewhere
            f"{index}: shard {outside!r} is not a file name in the folder; {convert_again(path)}"
        )
    if missing := [f for f in files if not f.is_file()]:
        raise ModelLoadError(
            f"{missing[0]}: a weight shard listed in {INDEX} is missing; {convert_again(path)}"
        )
    return files


def load_model(path: str | Path) -> AIM:
    """The model in `path`, in eval mode; weights are read lazily, on first use."""
    path = Path(path)
    config = read_config(path)
    check_format(path, config)
    args = model_args(path, config)
    files = weight_files(path)
    weights = {}
    for f in files:
        try:
            tensors = mx.load(mlx_path(f))  # lazy: read on first use
        except NotUtf8Path as e:
            raise ModelLoadError(str(e)) from None
        except (RuntimeError, ValueError, OSError) as e:  # MLX's reader: damaged or not a file
            raise ModelLoadError(
                f"{f}: cannot read the weights ({e}); {convert_again(path)}"
            ) from None
        if twice := next((k for k in tensors if k in weights), None):  # else the last one won
            raise ModelLoadError(f"{f}: {twice!r} is in another shard too; {convert_again(path)}")
        weights.update(tensors)
    # What the tensors take once read: the files' size, more where their bytes overlap (such
    # a file is refused just below, but may first claim more than the memory).
    check_fits(sum(v.nbytes for v in weights.values()), str(path))
    for f in files:
        _check_layout(path, f, args)
    _check_blocks(path, args, weights)  # before building them: config.json may claim millions
    with ops.random_key_kept():
        model = AIM(args)  # its random init is lazy, never computed: the weights replace it
    if q := config.get("quantization"):
        _quantize(path, model, q)
    _check_weights(path, model, weights, MX_DTYPES[config["dtype"]])
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    return model


def _quantize(path: Path, model: AIM, q: dict):
    """Quantize the layers config.json lists; ModelLoadError for one that cannot be (a module
    without quantized form, an input size that is not a multiple of the group size)."""
    layers = set(q["layers"])

    def chosen(name: str, module) -> bool:
        if name in layers and not hasattr(module, "to_quantized"):
            raise ModelLoadError(
                f"{path}/config.json: quantization lists {name!r}, which is not a linear "
                f"layer; {convert_again(path)}"
            )
        return name in layers

    try:
        nn.quantize(
            model,
            group_size=q["group_size"],
            bits=q["bits"],
            mode=q.get("mode", "affine"),
            class_predicate=chosen,
        )
    except ModelLoadError:
        raise
    except ValueError as e:  # MLX's quantize
        raise ModelLoadError(
            f"{path}/config.json: quantization does not fit the layers ({e}); {convert_again(path)}"
        ) from None


class NotUtf8Path(ValueError):
    pass


def mlx_path(path: Path) -> str:
    """`path` for MLX's readers, which take UTF-8 names only (a Linux name may hold any bytes:
    MLX says std::bad_cast)."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise NotUtf8Path(
            f"{path}: MLX cannot open a file whose path is not valid UTF-8; rename the folder "
            "(or move the model) to a UTF-8 name"
        ) from None
    return name


def convert_again(path: Path) -> str:
    """What to do about a damaged folder: for a cache entry, remove it (converted again on
    next use); else convert again."""
    from . import cache

    try:
        in_cache = path.resolve().parent == (cache.cache_root() / "models").resolve()
    except cache.CacheError:
        in_cache = False
    if in_cache:
        return f"remove it with `aim-mlx cache rm {path.name}` (converted again on next use)"
    return "convert the model again"


def _check_layout(path: Path, f: Path, args: ModelArgs):
    """ModelLoadError unless each tensor of `f` has bytes of its own: MLX's reader lets tensors
    share bytes or skip some (a header edited to point a tensor at another's weights loaded a
    silently different model). safetensors' own reader checks the byte ranges. The header's
    metadata is checked against config.json's architecture too (`_check_architecture`)."""
    try:
        with safe_open(mlx_path(f), framework="numpy") as weights:
            metadata = weights.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{f}: damaged weights ({e}); {convert_again(path)}") from None
    _check_architecture(path, f, args, metadata)


def _check_architecture(path: Path, f: Path, args: ModelArgs, metadata: dict[str, str]):
    """ModelLoadError if config.json's architecture differs from the one the converter recorded
    in `f`'s metadata: the weights cannot tell an edited head count, which made a silently
    different model. Folders converted before it was recorded have none: not checked."""
    for name, value in architecture_metadata(args).items():
        if name in metadata and metadata[name] != value:
            raise ModelLoadError(
                f"{path}/config.json says {name} {value}, but {f.name} was converted with "
                f"{name} {metadata[name]}: config.json was edited or damaged; "
                f"{convert_again(path)}"
            )


def _check_blocks(path: Path, args, weights: dict):
    """Every block that config.json names has weights, checked before the model (and so each
    block) is built."""
    blocks = {int(m[1]) for k in weights if (m := re.match(r"trunk\.blocks\.(\d+)\.", k))}
    missing = next((i for i in range(args.num_blocks) if i not in blocks), None)
    if missing is not None:
        raise ModelLoadError(
            f"{path}: weights lack 'trunk.blocks.{missing}.*' (config.json says num_blocks "
            f"{args.num_blocks}); {convert_again(path)}"
        )


def _check_weights(path: Path, model: AIM, weights: dict, dtype: mx.Dtype):
    """Every parameter present, with its shape and dtype: the config's dtype, uint32 for the
    packed weights of quantized layers (their scales and biases are in the config's dtype)."""
    expected = dict(tree_flatten(model.parameters()))
    if missing := sorted(expected.keys() - weights.keys()):
        raise ModelLoadError(f"{path}: weights lack {missing[0]!r} ({len(missing)} missing)")
    if extra := sorted(weights.keys() - expected.keys()):
        raise ModelLoadError(f"{path}: unexpected weight {extra[0]!r} ({len(extra)} in all)")
    for key, param in expected.items():
        if weights[key].shape != param.shape:
            raise ModelLoadError(
                f"{path}: {key!r} has shape {weights[key].shape}, the model expects {param.shape}"
            )
        want = mx.uint32 if param.dtype == mx.uint32 else dtype
        if weights[key].dtype != want:
            raise ModelLoadError(
                f"{path}: {key!r} is stored as {weights[key].dtype}, the config says {want}"
            )
