"""Core ML export: an `.mlpackage` built straight from an AIM model's weights.

No PyTorch: the ML Program is written with coremltools' MIL builder from the MLX weights, then
`ct.convert` serialises it (this works on Linux; only prediction needs macOS).

The classifier takes an RGB `image` (already resized and center-cropped to img_size, see
`preprocessing_note`), scaled by 1/255 by Core ML; the ImageNet mean/std are folded into the
patch-embedding convolution. It outputs `classLabel` and `classLabel_probs` (softmax over the
labels: ImageNet-1k's, or a trained head's classes). With `features=True` the model outputs
`features`: the head's pooled descriptor, (1, embed_dim), the vector its last linear layer reads
(attention-pooled, or for a linear head the standardised mean token).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .. import __version__, distributed, images
from ..checks import is_whole
from ..classifier import class_names
from ..constants import CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD
from ..errors import AimMlxError, OutputError
from ..labels import imagenet_classes
from ..models import PRESETS, ops, sincos_pos_embed
from ..models.heads import LinearPoolingHead
from ..output import move_into_place, prepare_output, signals_held, temp_path
from . import COMPRESSIONS, PRECISIONS, TARGETS

FP16_MAX = 65504.0
# A sample cannot bound every input: refuse float16 once activations pass half of its range.
FP16_HEADROOM = 2.0
# Which intermediate tensors are stored in float16 under each precision (see `_Graph`).
# "mixed" keeps the residual stream, layer norms, attention and the head's pooling in float32,
# but casts the inputs of the linear layers (layer-norm outputs, head norm) to float16.
FP16_KINDS = {
    "float16": {
        "patch_embed",
        "residual",
        "layer_norm",
        "linear",
        "attention_scores",
        "head_norm",
        "logits",
    },
    "mixed": {"patch_embed", "layer_norm", "linear", "head_norm", "logits"},
}
# Palettization: one look-up table per 16 output channels on iOS18, one per tensor before.
PALETTE_GROUP_SIZE = 16

INSTALL_HINT = "Core ML export needs coremltools: pip install 'aim-mlx[coreml]'"
LICENSE_NOTE = (
    "Weights: Apple's AIM v1 (github.com/apple/ml-aim), released under the Apple Sample Code "
    "License; the terms of the source checkpoint apply to this model."
)
PREVIEW_TYPE_KEY = "com.apple.coreml.model.preview.type"
# The Neural Engine refuses a weight file over 2 GiB ("Weight file size ... exceeds the maximum
# (2147483648 bytes)"); Core ML then runs the model on the GPU / CPU.
ANE_WEIGHT_LIMIT = 2**31


class ExportError(AimMlxError, ValueError):
    """A user-facing export problem (bad option, unsafe precision, existing output)."""


def require_coremltools():
    """Import coremltools (the `coreml` extra) quietly, or raise ExportError saying how to."""
    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)  # Linux: "Failed to load _MLModelProxy" etc. on import
    try:  # Ctrl-C and SIGTERM held back: its import swallows KeyboardInterrupt and SystemExit
        with signals_held():  # in bare `except:` clauses, and the export would go on
            import coremltools
    except ImportError as e:
        raise ExportError(f"{INSTALL_HINT} ({e})") from None
    finally:
        log.setLevel(level)
    return coremltools


def preprocessing_note(img_size: int) -> str:
    resize = math.ceil(img_size / CROP_RATIO)
    return (
        f"RGB image {img_size}x{img_size}: resize the shorter side to {resize} (bicubic), "
        f"center-crop {img_size}. ImageNet mean/std normalisation is part of the model."
    )


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in logit order, made unique for Core ML.

    Two classes are both called "crane" (the bird and the machine); a repeated name gets its
    WordNet id appended, e.g. "crane (n02012849)".
    """
    classes = imagenet_classes()
    names = [c.name for c in classes]
    return [f"{c.name} ({c.wnid})" if names.count(c.name) > 1 else c.name for c in classes]


def describe_model_ref(ref: str) -> tuple[str, str]:
    """(name, source) for the metadata of a model given as an official name or a folder."""
    config = Path(ref) / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        sources = c.get("sources")
        return c.get("name") or Path(ref).name, json.dumps(sources) if sources else str(ref)
    return Path(ref).name, str(ref)


def weight_file_size(package: str | Path) -> int:
    """Bytes of the package's weight file(s), the size the Neural Engine limit applies to."""
    weights = Path(package) / "Data" / "com.apple.CoreML" / "weights"
    return sum(f.stat().st_size for f in weights.glob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# float16 range check


def synthetic_sample(img_size: int, seed: int = 0) -> mx.array:
    """Two normalised (2, 3, S, S) images: uniform pixel noise and a smooth colour pattern."""
    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 1, (3, img_size, img_size))
    t = np.linspace(0, 1, img_size)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    pattern = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * np.pi * (xx + yy))])
    x = np.stack([noise, pattern])
    mean = np.array(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = np.array(IMAGENET_STD).reshape(1, 3, 1, 1)
    return mx.array(((x - mean) / std).astype(np.float32))


class _Observed(nn.Module):
    """A layer that reports the largest |value| of its input and output as the model runs."""

    def __init__(self, layer, see, block: int, out_kind: str, in_kind: str | None = None):
        super().__init__()
        self.layer = layer
        self._see, self._block, self._kinds = see, block, (in_kind, out_kind)

    def __call__(self, x: mx.array, add: mx.array | None = None) -> mx.array:
        in_kind, out_kind = self._kinds
        if in_kind:
            self._see(in_kind, x, self._block)
        out = self.layer(x)  # a linear layer's own output, without the residual it may add
        self._see(out_kind, out, self._block)
        return out if add is None else add + out

    def widened(self, dtype):  # as the layer it wraps (see `cpu_runner.widened_block`)
        wide = self.layer.widened(dtype)
        return self if wide is self.layer else self._around(wide)

    def rows(self, *spans):  # as the layer it wraps (see `cpu_runner.shard_block`)
        return self._around(self.layer.rows(*spans))

    def _around(self, layer):
        in_kind, out_kind = self._kinds
        return _Observed(layer, self._see, self._block, out_kind, in_kind)


def _observation_points(model) -> list[tuple[nn.Module, str, int, str, str | None]]:
    """(parent, child name, block, output kind, input kind) for every observed layer."""
    points = [(model.preprocessor.patchifier, "proj", -1, "patch_embed", None)]
    for i, blk in enumerate(model.trunk.blocks):
        points += [
            (blk, "norm_1", i, "layer_norm", "residual"),  # input: the residual stream
            # qkv's output is seen as attention's q, k and v (on the CPU, `ops.qkv_heads`
            # multiplies by its weight per head instead of calling it)
            (blk.attn, "proj", i, "linear", None),
            (blk, "norm_2", i, "layer_norm", "residual"),  # input: after attention
            (blk.mlp, "fc1", i, "linear", None),
            (blk.mlp, "fc2", i, "linear", None),
        ]
    head = model.head
    if isinstance(head, LinearPoolingHead):  # its linear layer reads the standardised mean
        return points + [(head, "linear", -1, "logits", "head_norm")]
    return points + [(head, "bn", -1, "head_norm", None), (head, "linear", -1, "logits", None)]


def activation_ranges(model, x: mx.array) -> dict[str, tuple[float, int]]:
    """Largest |value| of each kind of intermediate tensor in the model's own float32 forward
    pass on x.

    Returns kind -> (max |value|, block index or -1 outside the trunk). The kinds are those of
    `FP16_KINDS`: each layer is wrapped for the pass to report its output (and the layer norms
    their input, the residual stream), and attention reports its scores; then the head's keys,
    values and scores, which the package computes and the MLX head does not.
    """
    stats: dict[str, tuple[float, int]] = {}
    block = [-1]  # the block whose attention runs next

    def see(kind, a, where=-1):
        m = mx.abs(a).max().item()
        if kind not in stats or m > stats[kind][0]:
            stats[kind] = (m, where)
        if kind == "residual" or kind == "head_norm":
            block[0] = where

    def attention(q, k, v, scale):
        if block[0] >= 0:  # in the trunk: q, k and v are the qkv layer's output
            for a in (q, k, v):
                see("linear", a, block[0])
        see("attention_scores", (q * scale) @ k.swapaxes(-1, -2), block[0])
        return original_attention(q, k, v, scale)

    points = _observation_points(model)
    original_attention, compute_dtype = ops.attention, model.compute_dtype
    try:
        for parent, name, i, out_kind, in_kind in points:
            parent[name] = _Observed(parent[name], see, i, out_kind, in_kind)
        ops.attention, model.compute_dtype = attention, mx.float32
        feats = model.extract_features(x)
        for i, f in enumerate(feats):
            see("residual", f, i)
        head_input = model.head_input(feats)
        model.head(head_input)
    finally:
        ops.attention, model.compute_dtype = original_attention, compute_dtype
        for parent, name, *_ in points:
            parent[name] = parent[name].layer
    if not isinstance(model.head, LinearPoolingHead):
        # The package computes the head's keys and values for every token, which the MLX head
        # folds away (see `AttentionPoolingHead`): seen here from the head's own layers.
        head = model.head
        tokens = head.bn(head_input)
        see("linear", head.k(tokens))
        see("linear", head.v(tokens))
        see("attention_scores", head.scores(tokens))
    return stats


def check_fp16_range(model, precision: str, sample: mx.array, features: bool = False) -> None:
    """Raise ExportError if the float16 tensors of `precision` would leave float16's range.

    `features`: the export stops before the classifier's logits, so they are not checked.
    """
    limit = FP16_MAX / FP16_HEADROOM
    kinds = FP16_KINDS[precision] - ({"logits"} if features else set())
    stats = activation_ranges(model, sample)
    over = {k: v for k, v in stats.items() if k in kinds and v[0] > limit}
    if not over:
        return
    kind, (value, block) = max(over.items(), key=lambda kv: kv[1][0])
    where = f"block {block}" if block >= 0 else "outside the trunk"
    fix = (
        "use precision 'mixed' (--precision mixed), which keeps layer norms, attention and the "
        "residual stream in float32"
        if precision == "float16"
        else "use precision 'float32' (--precision float32)"
    )
    raise ExportError(
        f"{precision} export refused: on the range-check sample the {kind.replace('_', ' ')} "
        f"activations reach {value:.4g} ({where}), beyond float16's range (max 65504, checked "
        f"with {FP16_HEADROOM:g}x headroom: limit {limit:g}); {fix}."
    )


# ---------------------------------------------------------------------------------------------
# weights


def float_weights(model) -> dict[str, mx.array]:
    """Every parameter under its official name, quantized layers dequantized (lazy arrays)."""
    params = dict(tree_flatten(model.parameters()))
    for name, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            scales, biases = params.pop(f"{name}.scales"), params.pop(f"{name}.biases", None)
            if m.mode == "affine":  # in float32, as the CPU computes them: rounded only once
                scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
            params[f"{name}.weight"] = mx.dequantize(
                m.weight, scales, biases, m.group_size, m.bits, mode=m.mode
            )
    return params


def folded_patch_embed(weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fold the ImageNet normalisation into the patch convolution (float64 math, exact).

    weight (D, p, p, 3) OHWI, bias (D,) -> OIHW weight and bias for inputs in [0, 1]:
    conv((x - mean) / std, w) + b == conv(x, w / std) + (b - sum(w * mean / std)).
    """
    w = weight.astype(np.float64).transpose(0, 3, 1, 2)  # (D, 3, p, p)
    mean = np.array(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = np.array(IMAGENET_STD).reshape(1, 3, 1, 1)
    w = w / std
    return w, bias.astype(np.float64) - (w * mean).sum(axis=(1, 2, 3))


# ---------------------------------------------------------------------------------------------
# the MIL program


class _Graph:
    """Builds the AIM program with coremltools' MIL builder.

    Two compute dtypes: `lo` for the weight-heavy layers (patch convolution, linear layers,
    GELU) and `hi` for the rest (layer norms, residual stream, attention, head pooling).
    float32: both fp32; float16: both fp16; mixed: lo fp16, hi fp32. Weights are handed to
    coremltools already in their final dtype, so a float16 export never holds float32 copies.
    """

    def __init__(self, mb, weights: dict, args, precision: str, target: str, head_kind: str):
        self.mb, self.weights, self.args, self.target = mb, weights, args, target
        self.head_kind = head_kind  # "attention" or "linear" (`LinearPoolingHead`)
        self.lo = "fp32" if precision == "float32" else "fp16"
        self.hi = "fp16" if precision == "float16" else "fp32"

    def w(self, name: str, dtype: str) -> np.ndarray:
        a = self.weights[name].astype(mx.float16 if dtype == "fp16" else mx.float32)
        return np.array(a)

    def np_const(self, a: np.ndarray, dtype: str) -> np.ndarray:
        return a.astype(np.float16 if dtype == "fp16" else np.float32)

    def cast(self, x, dtype: str):
        return x if x.dtype.__name__ == dtype else self.mb.cast(x=x, dtype=dtype)

    def linear(self, x, name: str, out_dtype: str | None = None, rows=None, bias=None):
        """x @ W.T (+ b) with W = weights[name] (or rows of it), b = weights[bias], in `lo`."""
        w = self.w(name, self.lo)
        if rows is not None:
            w = w[rows]
        b = {} if bias is None else {"bias": self.w(bias, self.lo)}
        y = self.mb.linear(x=self.cast(x, self.lo), weight=w, **b)
        return self.cast(y, out_dtype or self.hi)

    def layer_norm(self, x, prefix: str):
        mb, hi = self.mb, self.hi
        return mb.layer_norm(
            x=self.cast(x, hi),
            axes=[-1],
            gamma=self.w(f"{prefix}.weight", hi),
            beta=self.w(f"{prefix}.bias", hi),
            epsilon=np.float16(self.args.norm_eps) if hi == "fp16" else self.args.norm_eps,
        )

    def heads(self, x, n: int):
        """(1, n, D) -> (1, H, n, head_dim)"""
        H, D = self.args.num_heads, self.args.embed_dim
        x = self.mb.reshape(x=x, shape=[1, n, H, D // H])
        return self.mb.transpose(x=x, perm=[0, 2, 1, 3])

    def attention(self, q, k, v):
        """softmax(q k^T / sqrt(head_dim)) v over (1, H, n, head_dim), in `hi`."""
        mb = self.mb
        if self.target == "iOS18":
            return mb.scaled_dot_product_attention(query=q, key=k, value=v)
        scale = self.args.head_dim**-0.5
        q = mb.mul(x=q, y=np.float16(scale) if self.hi == "fp16" else np.float32(scale))
        scores = mb.matmul(x=q, y=k, transpose_y=True)
        return mb.matmul(x=mb.softmax(x=scores, axis=-1), y=v)

    def patch_embed(self, image, img_size: int):
        """(1, 3, S, S) pixels in [0, 1] -> tokens (1, N, D) in `hi`."""
        mb, D, p = self.mb, self.args.embed_dim, self.args.patch_size
        pre = "preprocessor.patchifier"
        w, b = folded_patch_embed(
            np.array(self.weights[f"{pre}.proj.weight"].astype(mx.float32)),
            np.array(self.weights[f"{pre}.proj.bias"].astype(mx.float32)),
        )
        x = mb.conv(
            x=self.cast(image, self.lo),
            weight=self.np_const(w, self.lo),
            bias=self.np_const(b, self.lo),
            strides=[p, p],
            pad_type="valid",
        )  # (1, D, g, g)
        g = img_size // p
        x = mb.transpose(x=mb.reshape(x=x, shape=[1, D, g * g]), perm=[0, 2, 1])
        x = self.layer_norm(x, f"{pre}.norm")
        pos = sincos_pos_embed(g, g, D)
        return mb.add(x=x, y=self.np_const(np.array(pos)[None], self.hi))

    def block(self, x, i: int, n: int):
        mb, D = self.mb, self.args.embed_dim
        pre = f"trunk.blocks.{i}"
        h = self.layer_norm(x, f"{pre}.norm_1")
        q, k, v = (
            self.heads(self.linear(h, f"{pre}.attn.qkv.weight", rows=slice(j * D, (j + 1) * D)), n)
            for j in range(3)
        )
        o = mb.reshape(
            x=mb.transpose(x=self.attention(q, k, v), perm=[0, 2, 1, 3]), shape=[1, n, D]
        )
        x = mb.add(x=x, y=self.linear(o, f"{pre}.attn.proj.weight"))
        h = self.layer_norm(x, f"{pre}.norm_2")
        h = mb.gelu(x=self.linear(h, f"{pre}.mlp.fc1.weight", out_dtype=self.lo), mode="EXACT")
        return mb.add(x=x, y=self.linear(h, f"{pre}.mlp.fc2.weight"))

    def pooled(self, x, n: int):
        """The head up to its last linear layer: (1, N, D) -> (1, D) in `hi`."""
        mb, args, hi = self.mb, self.args, self.hi
        H, D = args.num_heads, args.embed_dim
        mean = self.w("head.bn.running_mean", "fp32").astype(np.float64)
        var = self.w("head.bn.running_var", "fp32").astype(np.float64)
        scale = 1 / np.sqrt(var + args.norm_eps)
        if self.head_kind == "linear":  # the mean token, standardised
            x = mb.reduce_mean(x=x, axes=[1], keep_dims=False)
        x = mb.add(x=mb.mul(x=x, y=self.np_const(scale, hi)), y=self.np_const(-mean * scale, hi))
        if self.head_kind == "linear":
            return x
        k = self.heads(self.linear(x, "head.k.weight"), n)
        v = self.heads(self.linear(x, "head.v.weight"), n)
        q = self.w("head.cls_token", hi).reshape(1, H, 1, D // H)
        return mb.reshape(x=self.attention(q, k, v), shape=[1, D])

    def forward(self, image, img_size: int, features: bool):
        mb, args = self.mb, self.args
        n = (img_size // args.patch_size) ** 2
        x = self.patch_embed(image, img_size)
        probe = []
        for i in range(max(args.probe_layers) + 1):
            x = self.block(x, i, n)
            if i in args.probe_layers:
                probe.append(x)
        # The mean, each layer scaled before the sum: in float16 the sum of the layers could
        # leave the range the check allows each of them (their mean cannot).
        one = 1.0 / len(probe)
        one = np.float16(one) if self.hi == "fp16" else np.float32(one)
        x = mb.mul(x=probe[0], y=one)
        for f in probe[1:]:
            x = mb.add(x=x, y=mb.mul(x=f, y=one))
        pooled = self.pooled(x, n)
        if features:
            return mb.cast(x=pooled, dtype="fp32", name="features")
        bias = "head.linear.bias" if self.head_kind == "linear" else None
        logits = self.linear(pooled, "head.linear.weight", out_dtype="fp32", bias=bias)
        return mb.softmax(x=logits, axis=-1, name="probabilities")


# ---------------------------------------------------------------------------------------------
# export


def default_name(args) -> str:
    for name, p in PRESETS.items():
        if (p["embed_dim"], p["num_blocks"]) == (args.embed_dim, args.num_blocks):
            return name
    return f"AIM v1 (embed {args.embed_dim}, {args.num_blocks} blocks)"


@contextmanager
def _progress_bars(progress: bool):
    """coremltools draws tqdm bars with no option to hide them: while it runs, tqdm's default
    becomes "only on a terminal" (progress) or "never"."""
    from tqdm import tqdm

    init = tqdm.__dict__["__init__"]
    tqdm.__init__ = functools.partialmethod(init, disable=None if progress else True)
    try:
        yield
    finally:
        tqdm.__init__ = init


def _compress(ct, mlmodel, compress: str, target: str):
    """Compress the weights of the linear layers and the patch convolution."""
    if compress == "none":
        return mlmodel
    cto = ct.optimize.coreml
    if compress == "int8":
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel"
        )
        fn = cto.linear_quantize_weights
    else:
        grouped = target == "iOS18"  # per-grouped-channel tables need iOS18
        op = cto.OpPalettizerConfig(
            mode="kmeans",
            nbits=int(compress.removeprefix("palettize")),
            granularity="per_grouped_channel" if grouped else "per_tensor",
            group_size=PALETTE_GROUP_SIZE,
        )
        fn = cto.palettize_weights
    config = cto.OptimizationConfig(op_type_configs={"linear": op, "conv": op})
    return fn(mlmodel, config)


def _describe(
    mlmodel,
    *,
    name,
    source,
    license,
    args,
    img_size,
    precision,
    compress,
    target,
    features,
    trained_head=None,
):
    classes = f"{args.num_classes} classes of a trained head" if trained_head else "ImageNet-1k"
    if not trained_head and args.num_classes != len(imagenet_classes()):
        classes = f"{args.num_classes} classes, not ImageNet-1k's"
    kind = "feature extractor" if features else f"image classifier ({classes})"
    mlmodel.short_description = (
        f"{name}: AIM v1 {kind}, {img_size}x{img_size} RGB input, {precision} precision"
        f"{'' if compress == 'none' else ', ' + compress}. Exported by aim-mlx {__version__}."
    )
    mlmodel.author = "Apple (AIM v1); Core ML export by aim-mlx"
    mlmodel.license = license
    mlmodel.version = __version__
    mlmodel.input_description["image"] = preprocessing_note(img_size)
    if features:
        linear = trained_head is not None and trained_head.kind == "linear"
        pooling = "standardised mean-pooled" if linear else "attention-pooled"
        mlmodel.output_description["features"] = (
            f"{pooling} descriptor ({args.embed_dim} floats) of probe "
            f"layers {list(args.probe_layers)}"
        )
    else:
        mlmodel.output_description["classLabel"] = f"most likely class ({classes})"
        mlmodel.output_description["classLabel_probs"] = "probability of each class (softmax)"
    meta = mlmodel.user_defined_metadata
    if not features:
        meta[PREVIEW_TYPE_KEY] = "imageClassifier"
    meta.update(
        {
            "aim_mlx.model": name,
            "aim_mlx.source": source,
            "aim_mlx.img_size": str(img_size),
            "aim_mlx.preprocessing": preprocessing_note(img_size),
            "aim_mlx.precision": precision,
            "aim_mlx.compression": compress,
            "aim_mlx.target": target,
            "aim_mlx.probe_layers": ",".join(str(i) for i in args.probe_layers),
            "aim_mlx.version": __version__,
        }
    )
    if trained_head:
        meta.update(
            {
                "aim_mlx.head": Path(trained_head.path).name,
                "aim_mlx.head_kind": trained_head.kind,
                "aim_mlx.head_trunk_sha256": trained_head.config["trunk"]["sha256"],
            }
        )


def _checked_labels(model, labels: list[str] | None) -> list[str]:
    """The classifier's labels: `labels`, else the model's class names (`export_coreml`),
    checked: one per class, distinct, UTF-8 text."""
    num_classes = model.args.num_classes
    names = class_names(model)  # a trained head's, "class I" for a head of another size
    labels = labels or (imagenet_labels() if names is None else list(names))
    if len(labels) != num_classes:
        raise ExportError(
            f"the model has {num_classes} classes but {len(labels)} labels were given"
        )
    repeated = [label for label, n in Counter(labels).items() if n > 1]
    if repeated:  # classLabel_probs maps each label to one probability: one would be lost
        raise ExportError(f"the label {repeated[0]!r} is given more than once")
    for label in labels:  # a Linux folder name's bytes that are not UTF-8 (surrogates)
        try:
            str(label).encode("utf-8")
        except UnicodeEncodeError:
            raise ExportError(
                f"the label {label!r} is not UTF-8 text, which Core ML's labels must be"
            ) from None
    return labels


def _convert(ct, program, shape: tuple[int, ...], opset, labels: list[str] | None):
    """The MIL `program` as an mlprogram taking an RGB image of `shape`: a classifier of
    `labels`, or (None) a feature extractor."""
    # No constant deduplication: a linear layer's zero bias merged with a LayerNorm's zero beta
    # (as in freshly initialised weights) makes the compressors refuse the shared constant.
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes({"common::const_deduplication"})
    image_input = ct.ImageType(name="image", shape=shape, scale=1 / 255, color_layout="RGB")
    return ct.convert(
        program,
        pass_pipeline=pipeline,
        inputs=[image_input],
        classifier_config=None if labels is None else ct.ClassifierConfig(labels),
        minimum_deployment_target=opset,
        compute_precision=ct.precision.FLOAT32,  # dtypes set op by op in the program
        convert_to="mlprogram",
        skip_model_load=True,
    )


def export_coreml(
    model,
    out: str | Path,
    *,
    precision: str = "float16",
    compress: str = "none",
    img_size: int | None = None,
    target: str = "iOS17",
    features: bool = False,
    name: str | None = None,
    source: str | None = None,
    license: str = LICENSE_NOTE,
    labels: list[str] | None = None,
    sample: mx.array | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write `model` (an `aim_mlx.models.AIM`) as a Core ML `.mlpackage` at `out`.

    precision: "float16", "float32" or "mixed" (float16 weights and linear layers; layer norms,
        attention, the residual stream and the head's pooling in float32). Before a float16 or
        mixed export the model runs on `sample` (normalised NCHW images; default
        `synthetic_sample`) and the export is refused if activations would overflow float16.
    compress: "none", "int8" (per-channel linear quantization), "palettize4" / "palettize6"
        (k-means look-up tables: per 16 channels on iOS18, per tensor on iOS17).
    target: "iOS17" (attention as matmul/softmax) or "iOS18" (fused scaled_dot_product_attention).
    features: output the head's pooled `features` instead of the classifier's outputs.
    labels: the class names (distinct) in logit order; default: a trained head's classes
        (`aim_mlx.load(M, head=FOLDER)`), ImageNet-1k's for a head of 1000 classes, else
        "class 0", "class 1", ... (as `aim-mlx classify` names them).
    progress: coremltools' progress bars on stderr (drawn only when it is a terminal).
    """
    images.check_model(model)  # a name or folder: aim_mlx.load it first, as for classify
    args = model.args
    img_size = args.img_size if img_size is None else img_size
    _check_options(precision, compress, target, img_size, args.patch_size)
    img_size = int(img_size)
    labels = None if features else _checked_labels(model, labels)
    out = check_output(out, overwrite)  # once the options are known good: it creates folders
    ct = require_coremltools()
    from coremltools.converters.mil import Builder as mb

    if precision != "float32":
        sample = synthetic_sample(img_size) if sample is None else sample
        check_fp16_range(model, precision, sample, features)

    head_kind = "linear" if isinstance(model.head, LinearPoolingHead) else "attention"
    graph = _Graph(mb, float_weights(model), args, precision, target, head_kind)
    opset = getattr(ct.target, target)
    shape = (1, 3, img_size, img_size)

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=opset)
    def program(image):
        return graph.forward(image, img_size, features)

    # coremltools' temporary packages (as big as the model, one per compression step) go
    # beside the output: on the disk checked for it, and cleared after a SIGKILL by the next run.
    work = temp_path(out)
    work.mkdir()
    try:
        with _temporary_files_in(work):
            with _progress_bars(progress):
                mlmodel = _convert(ct, program, shape, opset, labels)
                del program
                mlmodel = _compress(ct, mlmodel, compress, target)
            _describe(
                mlmodel,
                name=name or default_name(args),
                source=source or "unknown",
                license=license,
                args=args,
                img_size=img_size,
                precision=precision,
                compress=compress,
                target=target,
                features=features,
                trained_head=getattr(model, "trained_head", None),
            )
            mlmodel.save(str(work / out.name))
            move_into_place(work / out.name, out, replace=overwrite)
    except OutputError as e:  # without --force: it appeared during the export
        raise ExportError(str(e)) from None
    except (OSError, RuntimeError) as e:  # disk full, I/O error (RuntimeError: "[MIL FileWriter]")
        if isinstance(e, RuntimeError) and "FileWriter" not in str(e):
            raise
        reason = getattr(e, "strerror", None) or e
        raise ExportError(f"cannot write {out} (is the disk full?): {reason}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


@dataclass
class ExportResult:
    """What `export_model` wrote."""

    path: Path  # the package (links resolved)
    weight_bytes: int  # of its weight file: over ANE_WEIGHT_LIMIT, the Neural Engine refuses it
    dequantized_bits: int | None  # the model's quantized weights, now float in the package


def export_model(
    model: str | Path,
    out: str | Path,
    *,
    head: str | None = None,
    dtype: str | None = None,
    precision: str = "float16",
    compress: str = "none",
    img_size: int | None = None,
    target: str = "iOS17",
    features: bool = False,
    sample_paths: Iterable[str | Path] = (),
    force: bool = False,
    progress: bool = True,
) -> ExportResult:
    """`export_coreml` of the model `aim_mlx.load(model, head, dtype)` gives (a name or a
    folder; `head` may be a trained head's folder), its name and source in the metadata.

    Checked before the model is loaded (perhaps downloaded): the options, coremltools, the output
    (an existing package is replaced only with `force`) and the `sample_paths` images, decoded
    for the float16 range check (none with precision float32). A sample that cannot be read:
    ImageError naming it. Under `mlx.launch` with several ranks: DistributedError, before any
    work (every rank would write the package).
    """
    from ..probe.head import is_head_folder
    from ..resolve import check_model_ref, known_args, load, resolve
    from ..transforms import preprocess

    distributed.one_process("export_model (aim-mlx export coreml)")
    check_model_ref(model)
    _check_choices(precision, compress, target)
    if img_size is not None and (args := known_args(model)):  # else: once the model is loaded
        _check_options(precision, compress, target, img_size, args.patch_size)
    if sample_paths and precision == "float32":
        raise ExportError(
            "sample_paths (--sample): images for the float16 range check; a float32 package has "
            "none (use them with precision float16 or mixed)"
        )
    require_coremltools()
    check_output(out, force, inputs=[model, head])  # before a download or conversion
    pictures = _open_samples(sample_paths)
    net = load(model, head, dtype, progress=progress)
    size = img_size or net.args.img_size
    _check_options(precision, compress, target, size, net.args.patch_size)  # before preprocess
    sample = mx.array(np.stack([preprocess(p, size) for p in pictures])) if pictures else None
    trunk_head = None if is_head_folder(head) else head  # a trained head: its trunk's folder
    name, source = describe_model_ref(resolve(model, trunk_head, dtype, progress=False))
    path = export_coreml(
        net,
        out,
        precision=precision,
        compress=compress,
        img_size=img_size,
        target=target,
        features=features,
        name=name,
        source=source,
        sample=sample,
        overwrite=force,
        progress=progress,
    )
    layers = (m for _, m in net.named_modules() if isinstance(m, nn.QuantizedLinear))
    return ExportResult(path, weight_file_size(path), next((m.bits for m in layers), None))


def _open_samples(paths: Iterable[str | Path]) -> list:
    """`export_model`'s sample images, decoded; ImageError naming one that cannot be."""
    from ..transforms import ImageError, open_image

    pictures = []
    for path in paths:
        try:
            pictures.append(open_image(path))
        except ImageError as e:
            raise ImageError(f"{path}: {e}") from None
    return pictures


_TEMPDIR_LOCK = threading.Lock()


@contextmanager
def _temporary_files_in(folder: Path):
    """tempfile's default folder set to `folder` while coremltools writes its temporary packages
    (as big as the model); one export at a time per process, as the setting is process-wide."""
    with _TEMPDIR_LOCK:
        saved, tempfile.tempdir = tempfile.tempdir, str(folder)
        try:
            yield
        finally:
            tempfile.tempdir = saved


def check_output(out: str | Path, overwrite: bool = False, inputs=()) -> Path:
    """The output path, if usable: a .mlpackage that can be written (missing folders are
    created), new unless `overwrite`."""
    out = Path(out)
    if out.suffix != ".mlpackage":
        raise ExportError(f"the output must end in .mlpackage, got {out}")
    try:
        return prepare_output(
            out,
            force=overwrite,
            inputs=inputs,
            replaceable=lambda d: (d / "Manifest.json").exists(),
        )
    except OutputError as e:
        raise ExportError(str(e)) from None


def _check_choices(precision, compress, target):
    for what, value, choices in (
        ("precision", precision, PRECISIONS),
        ("compress", compress, COMPRESSIONS),
        ("target", target, TARGETS),
    ):
        if value not in choices:
            raise ExportError(f"{what} must be one of {', '.join(choices)}, got {value!r}")


def _check_options(precision, compress, target, img_size, patch):
    _check_choices(precision, compress, target)
    if not is_whole(img_size) or img_size <= 0 or img_size % patch:
        raise ExportError(
            f"img_size must be a positive multiple of the patch size {patch}, got {img_size!r}"
        )
