"""Load a converted MLX model folder (config.json + safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .convert.converter import FORMAT_VERSION
from .errors import AimMlxError
from .memory import check_fits
from .models import AIM, ModelArgs


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
    except ValueError as e:
        raise ModelLoadError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    return config


def check_format(path: str | Path, config: dict) -> None:
    """Raise ModelLoadError unless `config` was written by this converter format version."""
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelLoadError(
            f"{path}: format version {version}, this aim-mlx reads {FORMAT_VERSION}; "
            "convert the checkpoints again"
        )


def weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no model*.safetensors weights")
    return files


def load_model(path: str | Path) -> AIM:
    """The model in `path`, in eval mode; weights are read lazily, on first use."""
    path = Path(path)
    config = read_config(path)
    check_format(path, config)
    try:
        model = AIM(ModelArgs.from_dict(config))  # random init is lazy: never computed
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}/config.json: {e}") from None
    if q := config.get("quantization"):
        layers = set(q["layers"])
        nn.quantize(
            model,
            group_size=q["group_size"],
            bits=q["bits"],
            mode=q.get("mode", "affine"),
            class_predicate=lambda p, _: p in layers,
        )
    files = weight_files(path)
    check_fits(sum(f.stat().st_size for f in files), str(path))
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except (RuntimeError, ValueError, OSError) as e:  # MLX's reader: damaged or not a file
            raise ModelLoadError(
                f"{f}: cannot read the weights ({e}); convert the model again"
            ) from None
    _check_weights(path, model, weights)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    return model


def _check_weights(path: Path, model: AIM, weights: dict):
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    if missing := sorted(expected.keys() - weights.keys()):
        raise ModelLoadError(f"{path}: weights lack {missing[0]!r} ({len(missing)} missing)")
    if extra := sorted(weights.keys() - expected.keys()):
        raise ModelLoadError(f"{path}: unexpected weight {extra[0]!r} ({len(extra)} in all)")
    for key, shape in expected.items():
        if weights[key].shape != shape:
            raise ModelLoadError(
                f"{path}: {key!r} has shape {weights[key].shape}, the model expects {shape}"
            )
