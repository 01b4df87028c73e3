"""One-shot conversion of official AIM v1 checkpoints into an MLX model folder.

The output folder holds `config.json` and safetensors weights under the official key names. Two
things differ from the PyTorch state dict: `preprocessor.patchifier.proj.weight` is stored OHWI
(MLX's convolution layout) instead of OIHW, and `head.bn.num_batches_tracked` (a training counter)
is dropped. Tensors are streamed one at a time from the checkpoint to the output, so memory stays
at about one tensor whatever the model size. Everything is written to a temporary folder that is
renamed into place at the end: a failed or interrupted conversion leaves nothing behind.

config.json records the SHA-256 of the source files ("sources"). SHA256SUMS holds the SHA-256 of
every file the conversion wrote, config.json included (hashed as they were written), in the
format `sha256sum -c` reads; `aim-mlx cache verify` checks it. Each weight file's safetensors
metadata records the architecture (`architecture_metadata`): the loader compares it with
config.json, since the weights cannot tell an edited head count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from errno import ENOSPC
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .. import __version__
from ..checks import is_whole
from ..constants import CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD, MX_DTYPES, GiB, as_dtype_name
from ..errors import AimMlxError, OutputError
from ..models import ops
from ..models.aim import AIM, PRESETS, ModelArgs, check_probe_layers, last_probe_layers
from ..output import move_into_place, prepare_output, temp_path
from .checkpoint import CheckpointError, file_sha256, open_checkpoint
from .safetensors_writer import SafetensorsWriter, tensor_nbytes

FORMAT_VERSION = 1
SHARD_BYTES = 5 * GiB
INDEX_FILE = "model.safetensors.index.json"
SUMS_FILE = "SHA256SUMS"
PATCH_WEIGHT = "preprocessor.patchifier.proj.weight"
DROPPED_KEYS = ("head.bn.num_batches_tracked",)
# The trunk's matmul weights are quantized. The head (k, v, linear: about 3% of the weights) stays
# in the chosen float dtype: quantizing it measurably moves the logits (tests/test_convert.py).
Q_BITS = (4, 8)
Q_GROUP_SIZES = (32, 64, 128)  # what MLX's affine quantization supports (mx.quantize)
Q_BITS_DEFAULT, Q_GROUP_SIZE_DEFAULT = 8, 64
# A conversion refuses tensors that take more than twice their files' size (plus this): views
# sharing one storage, or compressed records of zeros, would let a few MB fill the disk with TBs.
# Stored weights take their size; deflate saves a few percent on them.
SOURCE_SLACK = 64 * 2**20
BLOCK_KEY = re.compile(r"trunk\.blocks\.(0|[1-9]\d*)\.(.+)")
QUANTIZED_LAYER = re.compile(r"trunk\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)$")
PREPROCESS = {
    "resize_ratio": CROP_RATIO,
    "interpolation": "bicubic",
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
}


class ConversionError(AimMlxError, ValueError):
    """A conversion that cannot proceed; the message says what to do."""


class WriteError(ConversionError):
    """The output could not be written (a full disk, an I/O error): not the checkpoints' fault."""


@dataclass
class Source:
    """One tensor to convert: where it comes from and what the model expects."""

    key: str
    checkpoint: object
    shape: tuple[int, ...]  # in the model's layout


def convert(
    out: str | Path,
    *,
    backbone: str | Path | None = None,
    head: str | Path | None = None,
    hf_path: str | Path | None = None,
    probe_layers: str | Sequence[int] | None = None,
    num_heads: int | None = None,
    img_size: int | None = None,
    dtype: str = "float32",
    quantize: bool = False,
    q_bits: int = Q_BITS_DEFAULT,
    q_group_size: int = Q_GROUP_SIZE_DEFAULT,
    force: bool = False,
    progress: bool = True,
    name: str | None = None,
    verified: bool = False,
    into_cache: bool = False,
) -> Path:
    """Convert a backbone + head pair, or a hub-style folder / repo id, into an MLX folder `out`.

    `probe_layers` is "best", "last" or a list of block indices; None takes it from the hub
    config, or from a head file named `*_best_layers*` / `*_last_layers*`. `verified`: the
    source files' SHA-256 were checked (a hub download), so their CRC-32s are not checked again.
    `into_cache`: `out` is a cache entry (`resolve`), which may lie anywhere, even inside the
    checkpoints' folder (AIM_MLX_CACHE=./cache).
    """
    dtype = as_dtype_name(dtype)  # mx.float16 too, as aim_mlx.load takes it
    if dtype not in MX_DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of {', '.join(MX_DTYPES)}")
    q = _quantization(quantize, q_bits, q_group_size)
    sources_given = [] if into_cache else [backbone, head, hf_path]
    out = _check_output(out, force, sources_given, into_cache)

    files, hub_config = _source_files(backbone, head, hf_path, progress)
    checkpoints = [_open(f, verified) for f in files]
    tensors = _merge(checkpoints)
    args = _resolve_args(tensors, hub_config, files, probe_layers, num_heads, img_size)
    sources = _match(tensors, args)
    _check_source_bytes(sources, files)

    if q:
        q["layers"] = _check_quantizable(sources, q, dtype, progress)
    plan = _plan(sources, MX_DTYPES[dtype], q)
    config = _folder_config(name or _default_name(args), args, dtype, q)
    trunk_files = {Path(s.checkpoint.path) for s in sources if not s.key.startswith("head.")}
    hasher = _SourceHasher(files, trunk_files)
    metadata = {"format": "mlx", **architecture_metadata(args)}
    return _write_folder(out, plan, config, metadata, force, progress, hasher)


def _quantization(quantize: bool, bits, group_size) -> dict | None:
    """The config's "quantization" (None without `quantize`), its options checked; the
    "layers" it applies to are added once the checkpoints are read."""
    if quantize:
        bits, group_size = check_quantize_options(bits, group_size)
        return {"bits": bits, "group_size": group_size, "mode": "affine"}
    if (bits, group_size) != (Q_BITS_DEFAULT, Q_GROUP_SIZE_DEFAULT):  # as --q-bits without -q
        raise ConversionError(
            f"q_bits={bits!r}, q_group_size={group_size!r} apply with quantize=True only; "
            "without it the weights are not quantized"
        )
    return None


def _check_output(out: str | Path, force: bool, inputs: list, into_cache: bool) -> Path:
    """`output.prepare_output` for a model folder, its refusal a ConversionError."""
    try:
        return prepare_output(
            out,
            force=force,
            inputs=inputs,
            replaceable=_is_model_folder,
            cache_entry=into_cache,
        )
    except OutputError as e:
        raise ConversionError(str(e)) from None


def _folder_config(name: str, args: ModelArgs, dtype: str, q: dict | None) -> dict:
    """The converted folder's config.json."""
    return {
        "model_type": "aim-v1",
        "name": name,
        **args.to_dict(),
        "dtype": dtype,
        "quantization": q,
        "format_version": FORMAT_VERSION,
        "preprocess": {**PREPROCESS, "crop_size": args.img_size},
        "layout": {PATCH_WEIGHT: "OHWI (PyTorch: OIHW)", "dropped": list(DROPPED_KEYS)},
        "converter": f"aim-mlx {__version__}",
        "checksums": SUMS_FILE,  # the file beside it: `cache verify` says if it is removed
    }


def architecture_metadata(args: ModelArgs) -> dict[str, str]:
    """The architecture as safetensors metadata (JSON text of each ModelArgs field): what the
    weights cannot tell (num_heads, probe_layers, img_size, norm_eps) beside what they can."""
    return {name: json.dumps(value) for name, value in args.to_dict().items()}


def _check_source_bytes(sources: list[Source], files: list[Path]) -> None:
    """ConversionError if the tensors take far more bytes than their files (`SOURCE_SLACK`)."""
    claimed = sum(_source_nbytes(s) for s in sources)
    have = sum(f.stat().st_size for f in files)
    if claimed > 2 * have + SOURCE_SLACK:
        raise ConversionError(
            f"the tensors in {', '.join(str(f) for f in files)} take {claimed} bytes, more than "
            f"twice the files' {have}: tensors sharing their bytes, or records that inflate far "
            "(a damaged file, or a zip bomb); download or copy the files again"
        )


def _is_model_folder(folder: Path) -> bool:
    """A folder a conversion wrote: what --force may replace."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deep
        return False
    return (
        isinstance(config, dict)
        and config.get("model_type") == "aim-v1"  # not a trained head's config
        and "format_version" in config
    )


def check_quantize_options(bits, group_size, bits_name: str = "q_bits") -> tuple[int, int]:
    """(bits, group_size) as Python ints, if MLX can quantize with them, else ConversionError;
    `bits_name`: the caller's argument for the bits (`aim_mlx.load` takes quantize_bits)."""
    if not is_whole(bits) or bits not in Q_BITS:  # 8.0 passed `in`, then failed in MLX
        raise ConversionError(f"{bits_name} (--q-bits) must be 4 or 8, got {bits!r}")
    if not is_whole(group_size) or group_size not in Q_GROUP_SIZES:
        sizes = ", ".join(map(str, Q_GROUP_SIZES))
        raise ConversionError(
            f"q_group_size (--q-group-size) must be one of {sizes}, got {group_size!r}"
        )
    return int(bits), int(group_size)


def _check_quantizable(sources, q, dtype, progress) -> list[str]:
    """The trunk layers to quantize: those whose input size is a multiple of the group size.
    None of them is an error; some of them is said on stderr (the others stay in `dtype`)."""
    layers = sorted(_quantized_layers(sources, q))
    total = sum(1 for s in sources if QUANTIZED_LAYER.match(s.key.removesuffix(".weight")))
    g = q["group_size"]
    if not layers:
        raise ConversionError(
            f"no trunk layer's input size is a multiple of the group size {g}: nothing to "
            "quantize; pass a smaller q_group_size (--q-group-size)"
        )
    if len(layers) < total and progress:
        print(
            f"quantized {len(layers)} of {total} trunk linear layers (the others' input size "
            f"is not a multiple of the group size {g}; they stay in {dtype})",
            file=sys.stderr,
        )
    return layers


def parse_probe_layers(value: str | Sequence[int] | None):
    """'best' / 'last' / 'I,J,...' (or a sequence of ints) -> 'best' | 'last' | tuple | None."""
    if value is None or isinstance(value, str) and value in ("best", "last"):
        return value
    if isinstance(value, str):
        try:
            layers = tuple(int(v) for v in value.split(",") if v.strip())
        except ValueError:
            layers = ()
        if not layers:
            raise ConversionError(
                "probe_layers (--probe-layers) must be best, last or block indices like 12,13,14; "
                f"got {value!r}"
            )
        return layers
    try:
        return check_probe_layers(value, None)  # integers only: 2.5 is not rounded to 2
    except ValueError as e:
        raise ConversionError(f"probe_layers (--probe-layers): {e}") from None


def _source_files(backbone, head, hf_path, progress=True) -> tuple[list[Path], dict]:
    if hf_path is not None:
        if backbone or head:
            raise ConversionError(
                "give either hf_path (--hf-path) or backbone and head (--backbone, --head), "
                "not both"
            )
        folder = _hub_folder(hf_path, progress)
        config = _hub_config(folder / "config.json")
        files = sorted(folder.glob("model*.safetensors")) or sorted(
            folder.glob("pytorch_model*.bin")
        )
        if not files:
            raise ConversionError(
                f"{folder}: no model.safetensors or pytorch_model.bin found in the folder"
            )
        return files, config
    if not backbone or not head:
        raise ConversionError(
            "give backbone and head files (--backbone, --head: official *_backbone.pth and "
            "*_head_*.pth), or hf_path (--hf-path), a hub-style folder or repo id"
        )
    for f in (backbone, head):
        if not Path(f).is_file():
            raise ConversionError(f"{f}: no such file")
    return [Path(backbone), Path(head)], {}


def _hub_config(file: Path) -> dict:
    """A hub-style folder's config.json ({} without one); its values are checked with the
    architecture (ModelArgs)."""
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise ConversionError(f"{file}: cannot read it as JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def _hub_folder(hf_path, progress=True) -> Path:
    path = Path(hf_path)
    if path.is_dir():
        return path
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(hf_path)):
        raise ConversionError(f"{hf_path}: not a folder, nor a hub repo id like apple/AIM-600M")
    from ..hub import check_endpoint, hub_bars

    check_endpoint()  # before huggingface_hub is imported
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "model*.safetensors", "pytorch_model*.bin", "*.json"]
    try:
        with hub_bars(progress):
            return Path(snapshot_download(str(hf_path), allow_patterns=patterns))
    except Exception as e:
        raise ConversionError(f"could not download {hf_path} from the hub: {e}") from None


def _open(path: Path, verified: bool):
    try:
        return open_checkpoint(path, verified=verified)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None


def _merge(checkpoints) -> dict[str, object]:
    """key -> checkpoint holding it; a key in two files is an error."""
    owner = {}
    for ckpt in checkpoints:
        for key in ckpt.keys():
            if key in owner:
                raise ConversionError(
                    f"key {key!r} is in both {owner[key].path} and {ckpt.path}; "
                    "pass one backbone and one head"
                )
            owner[key] = ckpt
    return owner


def trunk_shape(tensors, files) -> dict[str, int]:
    """embed_dim, num_blocks and patch_size as the tensors ({key: checkpoint}) of `files` have
    them; ConversionError for files that hold no AIM v1 backbone."""
    if PATCH_WEIGHT not in tensors:
        raise ConversionError(
            f"no {PATCH_WEIGHT} in {', '.join(str(f) for f in files)}: not an AIM v1 backbone"
        )
    embed_dim, _, patch, _ = _shape(tensors, PATCH_WEIGHT, "(D, 3, P, P)")
    blocks = {int(m.group(1)) for k in tensors if (m := re.match(r"trunk\.blocks\.(\d+)\.", k))}
    if not blocks:
        raise ConversionError("no trunk.blocks.* keys: the backbone file is missing")
    return {"embed_dim": embed_dim, "num_blocks": max(blocks) + 1, "patch_size": patch}


def _resolve_args(tensors, hub_config, files, probe_layers, num_heads, img_size) -> ModelArgs:
    """Architecture from tensor shapes, completed by the hub config, a preset or the options."""
    found = trunk_shape(tensors, files)
    embed_dim, num_blocks, patch = found["embed_dim"], found["num_blocks"], found["patch_size"]
    for field, value in found.items():
        if field in hub_config and hub_config[field] != value:
            raise ConversionError(
                f"config.json says {field}={hub_config[field]} but the weights have {value}"
            )
    preset = _preset_for(embed_dim, num_blocks, patch)
    num_heads = _first_given(
        num_heads, hub_config.get("num_heads"), preset and PRESETS[preset]["num_heads"]
    )
    if num_heads is None:
        raise ConversionError(
            f"the weights (embed_dim {embed_dim}, {num_blocks} blocks) are not an official AIM "
            "size, and the head count cannot be read from them: pass num_heads (--num-heads)"
        )
    layers = _resolve_probe_layers(
        parse_probe_layers(probe_layers), hub_config, files, preset, num_blocks
    )
    head_w = "head.linear.weight" in tensors and _shape(tensors, "head.linear.weight", "(N, D)")
    fc1 = "trunk.blocks.0.mlp.fc1.weight" in tensors and _shape(
        tensors, "trunk.blocks.0.mlp.fc1.weight", "(4D, D)"
    )
    try:
        return ModelArgs(
            embed_dim=embed_dim,
            num_blocks=num_blocks,
            num_heads=num_heads,
            probe_layers=layers,
            patch_size=patch,
            img_size=_first_given(img_size, hub_config.get("img_size"), 224),
            num_classes=head_w[0] if head_w else 1000,
            mlp_ratio=fc1[0] // embed_dim if fc1 else 4,
        )
    except ValueError as e:
        where = f" (in {files[0].parent / 'config.json'} or the options)" if hub_config else ""
        raise ConversionError(f"{e}{where}") from None


def _first_given(*values):
    """The first value that is not None (a 0 is given, and refused by ModelArgs by name)."""
    return next((v for v in values if v is not None), None)


def _shape(tensors, key: str, layout: str) -> tuple[int, ...]:
    """The shape of a tensor the architecture is read from: as many dimensions as `layout`,
    none of them 0 (a damaged or foreign file), else ConversionError naming the key."""
    shape = tuple(tensors[key].shape(key))
    if len(shape) != layout.count(",") + 1 or not all(shape):
        raise ConversionError(
            f"{key!r} in {tensors[key].path} has shape {shape}, not {layout}: "
            "is this an AIM v1 checkpoint?"
        )
    return shape


def _resolve_probe_layers(choice, hub_config, files, preset, num_blocks) -> tuple[int, ...]:
    given = "probe_layers 'best' (--probe-layers best)"
    if choice is None:
        if "probe_layers" in hub_config:
            return hub_config["probe_layers"]  # checked by ModelArgs
        names = " ".join(f.name for f in files)
        if "last_layers" in names:
            choice = "last"
        elif "best_layers" in names or (hub_config and preset):
            choice = "best"  # the official hub repos carry the best-layers head
            named = next((f.name for f in files if "best_layers" in f.name), "")
            given = f"the head {named} (best layers, by its name)"
        else:
            raise ConversionError(
                "cannot tell which blocks the head reads: pass probe_layers (--probe-layers) "
                "best, last or block indices like 1,2,3,4,5,6"
            )
    if choice == "last":
        return last_probe_layers(num_blocks)
    if choice == "best":
        if not preset:
            raise ConversionError(
                f"{given} reads blocks known for the official sizes only; pass probe_layers "
                "(--probe-layers) block indices like 1,2,3,4,5,6"
            )
        return tuple(PRESETS[preset]["best"])
    return choice


def _match(tensors, args: ModelArgs) -> list[Source]:
    """Check the checkpoint against the model's parameters: every key, every shape."""
    before, block, after = _parameter_shapes(args)
    fixed, per_block = dict(before + after), dict(block)

    def expected_shape(key: str) -> tuple[int, ...] | None:  # None: not a parameter
        if m := BLOCK_KEY.fullmatch(key):
            return per_block.get(m[2]) if int(m[1]) < args.num_blocks else None
        return fixed.get(key)

    def expected():  # (key, shape) in the model's order
        yield from before
        for i in range(args.num_blocks):
            yield from ((f"trunk.blocks.{i}.{k}", shape) for k, shape in block)
        yield from after

    unexpected = sorted(k for k in tensors if k not in DROPPED_KEYS and expected_shape(k) is None)
    if unexpected:
        k = unexpected[0]
        raise ConversionError(
            f"unexpected key {k!r} in {tensors[k].path} ({len(unexpected)} in all); "
            "is this an AIM v1 checkpoint?"
        )
    present = sum(k not in DROPPED_KEYS for k in tensors)
    missing = len(fixed) + args.num_blocks * len(block) - present
    if missing:  # the first in the model's order; a damaged file may claim millions of blocks
        key, shape = next((k, shape) for k, shape in expected() if k not in tensors)
        part = "head" if key.startswith("head.") else "backbone"
        raise ConversionError(
            f"missing key {key!r} (shape {shape}, {missing} missing "
            f"in all): is the {part} file the right one?"
        )
    sources = []
    for key, shape in expected():
        ckpt = tensors[key]
        if tuple(ckpt.shape(key)) != _checkpoint_shape(key, shape):
            raise ConversionError(
                f"shape mismatch for {key!r}: {ckpt.path} has {tuple(ckpt.shape(key))}, "
                f"the model expects {_checkpoint_shape(key, shape)}"
            )
        if ckpt.dtype(key) not in MX_DTYPES:
            raise ConversionError(f"{key!r} in {ckpt.path} is {ckpt.dtype(key)}, not a float")
        sources.append(Source(key, ckpt, shape))
    return sources


def _parameter_shapes(args: ModelArgs):
    """The model's parameters before its blocks, in one block (without `trunk.blocks.<i>.`) and
    after them, as (key, shape) lists in the model's order: from a model of one block, since
    a damaged or hostile checkpoint can claim millions (each built block takes memory)."""
    with ops.random_key_kept():  # its random init is never used
        one = AIM(dataclasses.replace(args, num_blocks=1, probe_layers=(0,)))
    flat = [(k, tuple(v.shape)) for k, v in tree_flatten(one.parameters())]
    prefix = "trunk.blocks.0."
    first = next(i for i, (k, _) in enumerate(flat) if k.startswith(prefix))
    block = [(k.removeprefix(prefix), s) for k, s in flat if k.startswith(prefix)]
    rest = [(k, s) for k, s in flat if not k.startswith(prefix)]
    return rest[:first], block, rest[first:]


def _checkpoint_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A parameter's shape in the PyTorch checkpoint (the patch weight is OIHW there)."""
    return (shape[0], shape[3], shape[1], shape[2]) if key == PATCH_WEIGHT else shape


def _preset_for(embed_dim: int, num_blocks: int, patch_size: int) -> str | None:
    for name, p in PRESETS.items():
        if (p["embed_dim"], p["num_blocks"], 14) == (embed_dim, num_blocks, patch_size):
            return name
    return None


def _quantized_layers(sources, q) -> set[str]:
    if not q:
        return set()
    return {
        s.key.removesuffix(".weight")
        for s in sources
        if s.key.endswith(".weight")
        and QUANTIZED_LAYER.match(s.key.removesuffix(".weight"))
        and s.shape[-1] % q["group_size"] == 0
    }


def _plan(sources: list[Source], dtype: mx.Dtype, q: dict | None):
    """[(source, [(name, dtype, shape), ...])]: what each source tensor becomes."""
    layers = set(q["layers"]) if q else set()
    plan = []
    for s in sources:
        layer = s.key.removesuffix(".weight")
        if layer in layers:
            out_dim, in_dim = s.shape
            packed = (out_dim, in_dim * q["bits"] // 32)
            groups = (out_dim, in_dim // q["group_size"])
            outputs = [
                (f"{layer}.weight", mx.uint32, packed),
                (f"{layer}.scales", dtype, groups),
                (f"{layer}.biases", dtype, groups),
            ]
        else:
            outputs = [(s.key, dtype, s.shape)]
        plan.append((s, outputs))
    return plan


def _produce(source: Source, outputs, dtype: mx.Dtype, q: dict | None) -> list[mx.array]:
    try:
        w = source.checkpoint.load(source.key)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    if source.key == PATCH_WEIGHT:
        w = w.transpose(0, 2, 3, 1)
    w = w.astype(dtype)
    _check_finite(source, w)
    quantized = len(outputs) == 3  # weight, scales, biases
    arrays = list(mx.quantize(w, q["group_size"], q["bits"])) if quantized else [w]
    mx.eval(arrays)
    return arrays


def _check_finite(source: Source, w: mx.array) -> None:
    """ConversionError if `w` (the source tensor cast to the output dtype) holds NaN or Inf: a
    model made from it would give NaN for every image."""
    if _all_finite(w):
        return
    where = f"{source.checkpoint.path}: tensor {source.key!r}"
    raw = source.checkpoint.load(source.key)
    if not mx.all(mx.isfinite(raw)).item():
        bad = raw.size - mx.sum(mx.isfinite(raw)).item()
        raise ConversionError(
            f"{where} holds {bad} NaN or Inf value(s): the checkpoint is damaged, or saved from "
            "a training run that diverged; nothing was written"
        )
    largest = mx.max(mx.abs(raw)).item()
    raise ConversionError(
        f"{where} has values of size up to {largest:.4g}, past {str(w.dtype).split('.')[-1]}'s "
        f"largest, {mx.finfo(w.dtype).max:.4g}; convert with dtype bfloat16 or float32 (--dtype)"
    )


_EXPONENT_BITS = {mx.float16: 0x7C00, mx.bfloat16: 0x7F80}  # all set: Inf or NaN


def _all_finite(w: mx.array) -> bool:
    """Whether `w` holds no NaN or Inf, in numpy: several times faster than MLX's CPU reductions
    (about 5 GB/s here for float32, 2 GB/s for 16-bit floats, read as their bits)."""
    if w.dtype == mx.float32:
        return bool(np.isfinite(np.asarray(w)).all())
    if w.dtype in _EXPONENT_BITS:
        mask = _EXPONENT_BITS[w.dtype]
        return not np.any((np.asarray(w.view(mx.uint16)) & mask) == mask)
    return mx.all(mx.isfinite(w)).item()


def _source_nbytes(s: Source) -> int:
    return tensor_nbytes(MX_DTYPES[s.checkpoint.dtype(s.key)], s.shape)


def _shards(plan) -> list[list]:
    shards, current, size = [], [], 0
    for item in plan:
        nbytes = sum(tensor_nbytes(d, s) for _, d, s in item[1])
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
    return [*shards, current]


def _write_folder(
    out: Path, plan, config: dict, metadata: dict, force: bool, progress: bool, hasher
) -> Path:
    from tqdm import tqdm

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    tmp.mkdir()
    dtype, q = MX_DTYPES[config["dtype"]], config["quantization"]
    shards = _shards(plan)
    total = sum(_source_nbytes(s) for s, _ in plan)
    try:
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc="converting",
            disable=not progress or None,  # None: only on a terminal
            file=sys.stderr,
        ) as bar:
            index, written = {}, {}  # written: file name -> SHA-256
            for i, shard in enumerate(shards):
                name = (
                    "model.safetensors"
                    if len(shards) == 1
                    else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                )
                entries = [e for _, outputs in shard for e in outputs]
                with SafetensorsWriter(tmp / name, entries, metadata) as writer:
                    for source, outputs in shard:
                        arrays = _produce(source, outputs, dtype, q)
                        for (key, _, _), array in zip(outputs, arrays, strict=True):
                            writer.write(key, array)
                            index[key] = name
                        del arrays
                        bar.update(_source_nbytes(source))
                written[name] = writer.sha256
            if len(shards) > 1:
                shard_list = {"metadata": {"format": "mlx"}, "weight_map": index}
                written[INDEX_FILE] = _write(tmp / INDEX_FILE, json.dumps(shard_list, indent=1))
            config["sources"] = hasher.result()
            written["config.json"] = _write(tmp / "config.json", json.dumps(config, indent=2))
            sums = "".join(f"{sha}  {name}\n" for name, sha in sorted(written.items()))
            (tmp / SUMS_FILE).write_bytes(sums.encode())
        _move_into_place(tmp, out, force)
    except BaseException as e:
        hasher.stop.set()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, AimMlxError):  # disk full, I/O error
            hint = ": free some space and run the command again" if e.errno == ENOSPC else ""
            raise WriteError(f"{e.filename or out}: {e.strerror or e}{hint}") from None
        raise
    return out


def _write(file: Path, text: str) -> str:
    """Write `text` and a newline to `file`; the SHA-256 of what was written."""
    data = (text + "\n").encode()
    file.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _move_into_place(tmp: Path, out: Path, force: bool):
    try:
        move_into_place(tmp, out, replace=force)
    except OutputError as e:  # without --force: it appeared during the conversion
        raise ConversionError(str(e)) from None


class _SourceHasher(threading.Thread):
    """SHA-256 of the source files, computed on a second thread while the conversion runs."""

    def __init__(self, files: list[Path], trunk_files: set[Path]):
        super().__init__(daemon=True)
        self.files, self.trunk_files = files, trunk_files
        self.stop, self._result, self._error = threading.Event(), None, None
        self.start()

    def run(self):
        try:
            self._result = [
                {
                    "file": p.name,
                    "size": p.stat().st_size,
                    "sha256": file_sha256(p, stop=self.stop),
                    "trunk": Path(p) in self.trunk_files,  # holds trunk weights (probe heads' tie)
                }
                for p in self.files
            ]
        except OSError as e:  # a source moved or unreadable meanwhile: the conversion says so
            self._error = e

    def result(self) -> list[dict]:
        self.join()
        if self._error:
            raise self._error
        return self._result


def _default_name(args: ModelArgs) -> str:
    preset = _preset_for(args.embed_dim, args.num_blocks, args.patch_size)
    return preset or f"aim-custom-{args.embed_dim}x{args.num_blocks}"
