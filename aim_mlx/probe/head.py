"""A trained head's folder (weights + config.json), and attaching it to a trunk.

head.safetensors   the head module's parameters (float32)
config.json        format, kind, classes in order, probe layers, image size, the trunk it
                   was trained on (the SHA-256 of its source weights), training settings
                   and validation metrics
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import OptionError
from ..loader import mlx_path
from ..models import AIM, ops
from ..models.aim import AttentionPoolingHead, check_probe_layers, positive_int
from ..models.heads import LinearPoolingHead
from ..output import move_into_place, prepare_output, temp_path
from .data import ProbeError
from .features import TrunkInfo, trunk_info

HEAD_FORMAT = "aim-mlx-trained-head"
HEAD_FORMAT_VERSION = 1
KINDS = ("attention", "linear")
WEIGHTS = "head.safetensors"
KEYWORDS = ("best", "last")  # the official heads; a folder of that name is given as ./best


def is_head_folder(head) -> bool:
    """True when `head` names a trained head's folder rather than an official head keyword."""
    return head is not None and not (isinstance(head, str) and head in KEYWORDS)


def make_head(kind: str, args, num_classes: int) -> nn.Module:
    """A new head for a trunk with ModelArgs `args`, its weights for the caller to replace (MLX's
    random key is left as it was)."""
    with ops.random_key_kept():
        if kind == "attention":
            return AttentionPoolingHead(dataclasses.replace(args, num_classes=num_classes))
        if kind == "linear":
            return LinearPoolingHead(args.embed_dim, num_classes, eps=args.norm_eps)
    raise ProbeError(f"head kind must be one of {', '.join(KINDS)}, got {kind!r}")


@dataclass(frozen=True)
class TrainedHead:
    """What `attach` records on the model (as `model.trained_head`)."""

    path: str
    kind: str
    classes: tuple[str, ...]
    config: dict


def check_output(out: str | Path, force: bool = False, inputs=()) -> Path:
    """The head folder to write, checked before any work (`output.prepare_output`: new unless
    `force`, missing parents created, writable; never one of `inputs`, a folder holding one or
    inside one, such as the training images, where it would be read as a class); `force`
    replaces only a trained head's folder."""
    return prepare_output(out, force=force, inputs=inputs, replaceable=_is_head_output)


def _is_head_output(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deep
        return False
    return isinstance(config, dict) and config.get("format") == HEAD_FORMAT


def save_head(
    out: str | Path, head: nn.Module, config: dict, force: bool = False, checked: bool = False
) -> Path:
    """Write the folder atomically (a temporary folder renamed at the end). `checked`: `out`
    is what `check_output` returned when the command started, so that without `force` a folder
    there now appeared meanwhile and is kept (OutputError saying so)."""
    if force or not checked:  # with force, never over a folder that is not a head's
        out = check_output(out, force)
    tmp = temp_path(out)
    try:
        tmp.mkdir()
        weights = {k: v.astype(mx.float32) for k, v in tree_flatten(head.parameters())}
        mx.save_safetensors(str(tmp / WEIGHTS), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        move_into_place(tmp, out, replace=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_head_config(folder: str | Path) -> dict:
    folder = Path(folder)
    file = folder / "config.json"
    if not folder.is_dir():
        raise OptionError(
            f"head (--head) must be best, last or a trained head's folder, got {str(folder)!r}"
        )
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise ProbeError(
            f"head (--head) {folder}: no config.json; not a trained head's folder (make one "
            "with `aim-mlx probe train`)"
        ) from None
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise ProbeError(f"{file}: cannot read it ({e})") from None
    if not isinstance(config, dict) or config.get("format") != HEAD_FORMAT:
        raise ProbeError(f"{file}: not a trained head's config (no format {HEAD_FORMAT!r})")
    if config.get("format_version") != HEAD_FORMAT_VERSION:
        raise ProbeError(
            f"{file}: format version {config.get('format_version')}, this aim-mlx reads "
            f"{HEAD_FORMAT_VERSION}; train the head again"
        )
    try:
        _check_fields(config)
    except ValueError as e:
        raise ProbeError(f"{file}: {e}; train the head again (`aim-mlx probe train`)") from None
    return config


def _check_fields(config: dict) -> None:
    """ValueError naming the first field of a head config that cannot be used."""
    trunk = config.get("trunk")
    if not (
        isinstance(trunk, dict)
        and all(isinstance(trunk.get(k), str) for k in ("name", "sha256"))
        and isinstance(trunk.get("num_blocks"), int)
    ):
        raise ValueError(
            f"trunk must record the trunk's name, sha256 and num_blocks, got {trunk!r}"
        )
    classes = config.get("classes")
    if not isinstance(classes, list) or not classes:
        raise ValueError(f"classes must be a list of class names, got {classes!r}")
    if not all(isinstance(c, str) and c for c in classes):
        raise ValueError(f"classes must be non-empty strings, got {classes!r}")
    if len(set(classes)) < len(classes):
        repeated = next(c for c in classes if classes.count(c) > 1)
        raise ValueError(f"classes name {repeated!r} more than once")
    if config.get("kind") not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {config.get('kind')!r}")
    check_probe_layers(config.get("probe_layers"), trunk["num_blocks"])
    positive_int("img_size", config.get("img_size"))  # the trunk's patch size: in `attach`


def check_trunk(config: dict, trunk: TrunkInfo, folder) -> None:
    want = config["trunk"]
    heads = want.get("num_heads", trunk.num_heads)  # heads trained before it was recorded: any
    if want["sha256"] != trunk.sha256 or heads != trunk.num_heads:
        raise ProbeError(
            f"the head {folder} was trained on the trunk {want['name']} (weights sha256 "
            f"{want['sha256'][:12]}, {heads} heads), not on {trunk.describe()}; use it with the "
            "model it was trained on, or train a head for this one"
        )


def attach(model: AIM, folder: str | Path, trunk: TrunkInfo) -> AIM:
    """Replace the model's head by the trained head in `folder`; the model then reads the
    head's probe layers, takes its image size by default and carries `model.trained_head`."""
    config = read_head_config(folder)
    check_trunk(config, trunk, folder)
    classes = config["classes"]
    head = make_head(config["kind"], model.args, len(classes))
    try:
        weights = mx.load(mlx_path(Path(folder) / WEIGHTS))
        if bad := next((k for k, v in weights.items() if v.dtype != mx.float32), None):
            raise ValueError(f"{bad!r} is stored as {weights[bad].dtype}, not float32")
        if bad := next((k for k, v in weights.items() if not mx.isfinite(v).all()), None):
            raise ValueError(f"{bad!r} holds NaN or Inf; train the head again")
        head.load_weights(list(weights.items()), strict=True)
    except (OSError, ValueError, RuntimeError) as e:
        why = " ".join(str(e).split())  # MLX's messages can span lines
        raise ProbeError(f"{folder}/{WEIGHTS}: cannot load the head's weights ({why})") from None
    try:
        model.replace_head(head, config["probe_layers"], classes, config["img_size"])
    except ValueError as e:  # e.g. an image size the trunk's patches do not divide
        raise ProbeError(f"{Path(folder) / 'config.json'}: {e}") from None
    model.trained_head = TrainedHead(str(folder), config["kind"], tuple(classes), config)
    return model


def load_trunk(model, dtype: str | None = None, **kwargs) -> tuple[AIM, TrunkInfo]:
    """The model (with its official head) and its trunk's identity; what `resolve` accepts."""
    from ..resolve import check_memory, load_resolved

    check_memory(model, dtype, kwargs.get("quantize_bits"))
    folder, net = load_resolved(model, None, dtype, **kwargs)  # a folder: its own head
    if dtype and not kwargs.get("quantize_bits") and net.dtype != getattr(mx, dtype):
        net.set_dtype(getattr(mx, dtype))  # a converted folder stored in another dtype
    return net, trunk_info(folder)


def load_with_head(model, head, dtype: str | None = None, **kwargs) -> AIM:
    """`aim_mlx.load(model, head=FOLDER)`: the trunk of `model` with a trained head."""
    read_head_config(head)  # a bad head folder is reported before any download or conversion
    net, trunk = load_trunk(model, dtype, **kwargs)
    return attach(net, head, trunk)
