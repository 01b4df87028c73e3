"""AIM v1 (Autoregressive Image Models) in MLX.

Parameter names are the official PyTorch ones, so a converted checkpoint loads without renaming.
The one layout change: `preprocessor.patchifier.proj.weight` is stored OHWI (MLX's convolution
layout) instead of PyTorch's OIHW.

The file reads as the architecture: the config (ModelArgs, the official sizes), then the network
from the patch embedding to the head. Its layer types are in `layers`, the device-dependent
kernels in `ops`, and how the blocks are scheduled on the CPU in `cpu_runner`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import reprlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import ops
from .layers import FrozenBatchNorm, LayerNorm, Linear, PatchConv


@dataclass
class ModelArgs:
    embed_dim: int
    num_blocks: int
    num_heads: int
    probe_layers: tuple[int, ...]
    patch_size: int = 14
    img_size: int = 224
    num_classes: int = 1000
    mlp_ratio: int = 4
    norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, params: dict) -> ModelArgs:
        """Build from a config dict, ignoring keys that are not fields; ValueError naming the
        field for a missing or invalid value."""
        names = {f.name for f in dataclasses.fields(cls)}
        if missing := [
            n for n in ("embed_dim", "num_blocks", "num_heads", "probe_layers") if n not in params
        ]:
            raise ValueError(f"missing {', '.join(missing)}")
        return cls(**{k: v for k, v in params.items() if k in names})

    def __post_init__(self):
        """Every field checked, so that a bad config fails here, by name, not in the forward."""
        for name in INT_FIELDS:
            setattr(self, name, positive_int(name, getattr(self, name)))
        eps = self.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < 1:
            raise ValueError(f"norm_eps must be a number between 0 and 1, got {eps!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        widest = max(self.mlp_ratio, 3) * self.embed_dim
        if max(widest, self.num_classes, self.patch_size) >= 2**31:  # MLX's dimensions are int32
            raise ValueError(
                f"embed_dim {self.embed_dim}, mlp_ratio {self.mlp_ratio}, num_classes "
                f"{self.num_classes} or patch_size {self.patch_size} make a layer wider than "
                "2**31 - 1, the most MLX supports"
            )
        if self.embed_dim % 4:
            raise ValueError(f"embed_dim {self.embed_dim} must be a multiple of 4 (sin-cos)")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}"
            )
        self.probe_layers = check_probe_layers(self.probe_layers, self.num_blocks)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "probe_layers": list(self.probe_layers)}


INT_FIELDS = (
    "embed_dim",
    "num_blocks",
    "num_heads",
    "patch_size",
    "img_size",
    "num_classes",
    "mlp_ratio",
)


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_probe_layers(layers, num_blocks: int | None) -> tuple[int, ...]:
    """Block indices the head reads: a non-empty list of distinct blocks of the model (of any
    model while `num_blocks` is None: not known yet)."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ValueError(f"probe layers must be a list of block indices, got {_few(layers)}")
    layers = tuple(layers)
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"probe layers must be block indices (integers), got {_few(layers)}")
    layers = tuple(int(i) for i in layers)
    if not layers:
        raise ValueError("no probe layers given: the head needs at least one block")
    # Counter: count() for each was quadratic, minutes for a config listing 100,000 layers
    if repeated := sorted(i for i, n in Counter(layers).items() if n > 1):
        raise ValueError(f"probe layers {_few(layers)} name block {repeated[0]} more than once")
    if num_blocks is None and (bad := [i for i in layers if i < 0]):
        raise ValueError(f"probe layers {_few(bad)} are not block indices (0 or more)")
    if num_blocks is not None and (bad := [i for i in layers if not 0 <= i < num_blocks]):
        raise ValueError(f"probe layers {_few(bad)} are outside blocks 0..{num_blocks - 1}")
    return layers


_SHORT = reprlib.Repr()  # a config.json may list 300,000 layers: a dozen, then ...
_SHORT.maxlist = _SHORT.maxstring = _SHORT.maxother = 12


def _few(values) -> str:
    return _SHORT.repr(list(values) if isinstance(values, tuple) else values)


# Official architectures (head_dim 128, 224 px) and their two heads' probe layers.
PRESETS = {
    "aim-600M": dict(embed_dim=1536, num_blocks=24, num_heads=12, best=range(14, 20)),
    "aim-1B": dict(embed_dim=2048, num_blocks=24, num_heads=16, best=range(12, 18)),
    "aim-3B": dict(embed_dim=3072, num_blocks=24, num_heads=24, best=range(12, 18)),
    "aim-7B": dict(embed_dim=4096, num_blocks=32, num_heads=32, best=range(14, 20)),
}
LAST_LAYERS = 6  # the "last layers" heads read the last six blocks


def last_probe_layers(num_blocks: int) -> tuple[int, ...]:
    return tuple(range(max(0, num_blocks - LAST_LAYERS), num_blocks))


def preset_args(name: str, head: str = "best", **overrides) -> ModelArgs:
    """ModelArgs of an official size; `head` is "best" or "last"."""
    if name not in PRESETS or head not in ("best", "last"):  # any other head: last, silently
        raise ValueError(
            f"expected one of {', '.join(PRESETS)} and head best or last, got {name!r}, {head!r}"
        )
    p = dict(PRESETS[name])
    best = p.pop("best")
    layers = tuple(best) if head == "best" else last_probe_layers(p["num_blocks"])
    return ModelArgs(**{**p, "probe_layers": layers, **overrides})


@lru_cache(maxsize=32)
def sincos_pos_embed(grid_h: int, grid_w: int, dim: int) -> mx.array:
    """Fixed 2-D sin-cos embedding, (grid_h * grid_w, dim), row-major patch order.

    The first dim/2 channels encode the column index, the second dim/2 the row index.
    """
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")

    def encode(pos):  # (h*w,) -> (h*w, dim/2)
        out = pos.reshape(-1, 1).astype(np.float64) * omega
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return mx.array(np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32))


class PatchEmbed(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        p = args.patch_size
        self.proj = PatchConv(3, args.embed_dim, kernel_size=p, stride=p, bias=True)
        self.norm = LayerNorm(args.embed_dim, eps=args.norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        # x: (B, H, W, 3) -> tokens (B, h*w, D)
        x = self.proj(x)
        B, h, w, D = x.shape
        return self.norm(x.reshape(B, h * w, D))


class Preprocessor(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.patch_size = args.patch_size
        self.patchifier = PatchEmbed(args)

    def __call__(self, x: mx.array) -> mx.array:
        # x: (B, 3, H, W) -> (B, N, D)
        B, C, H, W = x.shape
        p = self.patch_size
        tokens = self.patchifier(x.transpose(0, 2, 3, 1))
        pos = sincos_pos_embed(H // p, W // p, tokens.shape[-1])
        return tokens + pos.astype(tokens.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        # x: (B, N, D) -> q, k, v, each (B, H, N, head_dim)
        return ops.qkv_heads(x, self.qkv, self.num_heads)

    def mix(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        # softmax(q k^T / sqrt(head_dim)) v, heads merged: (B, Nq, H * head_dim)
        out = ops.attention(q, k, v, self.scale)  # (B, H, Nq, head_dim)
        B, H, N, hd = out.shape
        return out.transpose(0, 2, 1, 3).reshape(B, N, H * hd)

    def __call__(self, x: mx.array) -> mx.array:
        # x: (B, N, D) -> proj(attention): (B, N, D)
        return self.proj(self.mix(*self.project(x)))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def hidden(self, x: mx.array) -> mx.array:
        # x: (B, N, D) -> GELU(fc1 x): (B, N, hidden)
        return ops.gelu(self.fc1(x))

    def __call__(self, x: mx.array, add: mx.array | None = None) -> mx.array:
        # (B, N, D) -> fc2 GELU(fc1 x), plus `add` (B, N, D) if given: the residual
        return self.fc2(self.hidden(x), add)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm_1(x)), then x + mlp(norm_2(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        D = args.embed_dim
        # sizes of the whole block (a shard keeps them: `cpu_runner.shard_block` divides them)
        self.embed_dim, self.hidden_dim = D, args.mlp_ratio * D
        self.norm_1 = LayerNorm(D, eps=args.norm_eps)
        self.attn = Attention(D, args.num_heads)
        self.norm_2 = LayerNorm(D, eps=args.norm_eps)
        self.mlp = MLP(D, self.hidden_dim)

    def attention(self, x: mx.array) -> mx.array:
        """Self-attention of norm_1(x), heads merged, before the output projection."""
        return self.attn.mix(*self.attn.project(self.norm_1(x)))

    def __call__(self, x: mx.array) -> mx.array:
        # x: (B, N, D) -> (B, N, D)
        x = self.attn.proj(self.attention(x), add=x)  # x + attention
        return self.mlp(self.norm_2(x), add=x)  # x + MLP


class Trunk(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.blocks = [Block(args) for _ in range(args.num_blocks)]
        # Kept for the checkpoint's sake; the classifier does not use its output.
        self.post_trunk_norm = LayerNorm(args.embed_dim, eps=args.norm_eps)


class AttentionPoolingHead(nn.Module):
    """BatchNorm (running statistics), then one learned query per head attending over the
    tokens, then a linear classifier.

    With one query per head, the key and value projections need not touch every token:
    q_h . (W_k,h x) = (W_k,h^T q_h) . x, and sum_n a_n W_v,h x_n = W_v,h (sum_n a_n x_n). So the
    query is taken back through W_k to the tokens' features, and W_v is applied to each head's
    pooled token: the same attention, with N times fewer multiplications for k and v.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        D = args.embed_dim
        self.num_heads = args.num_heads
        self.scale = args.head_dim**-0.5
        self.cls_token = mx.zeros((1, 1, D))
        self.k = Linear(D, D)
        self.v = Linear(D, D)
        self.linear = Linear(D, args.num_classes)
        self.bn = FrozenBatchNorm(D, eps=args.norm_eps, affine=False)

    def scores(self, x: mx.array) -> mx.array:
        """Each head's query against the normalised tokens x (B, N, D), scaled: (B, N, H)."""
        D, H = x.shape[-1], self.num_heads
        q = self.cls_token.astype(x.dtype).reshape(H, D // H)  # one query per head
        w_k = self.k.weight_as(x.dtype).reshape(H, D // H, D)  # each head's rows of W_k
        return x @ (mx.einsum("hc,hcd->hd", q, w_k) * self.scale).T  # x_n . W_k,h^T q_h

    def __call__(self, x: mx.array) -> mx.array:
        # x: (B, N, D) -> logits (B, num_classes)
        x = self.bn(x)
        B, N, D = x.shape
        weights = mx.softmax(self.scores(x), axis=1, precise=True)  # over the tokens
        tokens = weights.swapaxes(1, 2) @ x  # (B, H, D): each head's weighted mean token
        w_v = self.v.weight_as(x.dtype).reshape(self.num_heads, D // self.num_heads, D)
        pooled = mx.einsum("bhd,hcd->bhc", tokens, w_v)  # W_v,h tokens_h: (B, H, head_dim)
        return self.linear(pooled.reshape(B, D))


class AIM(nn.Module):
    """AIM v1 classifier: `model(x)` maps (B, 3, H, W) float images to logits (B, classes)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.preprocessor = Preprocessor(args)
        self.trunk = Trunk(args)
        self.head = AttentionPoolingHead(args)
        self.labels: tuple[str, ...] | None = None  # class names; None: ImageNet-1k's
        self.compute_dtype = None  # None: chosen per device (see `activation_dtype`)
        self.eval()

    def replace_head(self, head: nn.Module, probe_layers, labels, img_size: int | None = None):
        """Classify with `head` (the mean of `probe_layers`' outputs (B, N, D) -> logits
        (B, len(labels))) instead of the official one: a trained probe."""
        self.args = dataclasses.replace(
            self.args,
            probe_layers=tuple(probe_layers),
            num_classes=len(labels),
            img_size=img_size or self.args.img_size,
        )
        self.head = head
        self.labels = tuple(labels)
        self.eval()

    @property
    def dtype(self) -> mx.Dtype:
        """The dtype the weights are stored in."""
        return self.trunk.post_trunk_norm.weight.dtype

    def activation_dtype(self) -> mx.Dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return mx.float32 if ops.widen_low_precision() else self.dtype

    def extract_features(self, x, max_block_id: int | None = None) -> list[mx.array]:
        """Outputs of blocks 0..max_block_id, each (B, N, D).

        `max_block_id` None stops at the last probe layer, -1 runs every block.
        """
        n = self.args.num_blocks
        if max_block_id is not None and (
            isinstance(max_block_id, bool) or not isinstance(max_block_id, (int, np.integer))
        ):
            raise TypeError(f"max_block_id must be an int or None, got {max_block_id!r}")
        if max_block_id is None:
            max_block_id = max(self.args.probe_layers)
        elif max_block_id == -1:
            max_block_id = n - 1
        if not 0 <= max_block_id < n:
            raise ValueError(f"max_block_id must be -1 or in 0..{n - 1}, got {max_block_id}")
        x = self.preprocessor(self._check_input(x).astype(self.activation_dtype()))
        return ops.run_blocks(self.trunk.blocks[: max_block_id + 1], x)

    def head_input(self, features: list[mx.array]) -> mx.array:
        """Mean of the probe layers' raw outputs, (B, N, D)."""
        layers = self.args.probe_layers
        return sum(features[i] for i in layers) / len(layers)

    def __call__(self, x) -> mx.array:
        logits = self.head(self.head_input(self.extract_features(x)))
        return logits.astype(mx.float32)

    def _check_input(self, x) -> mx.array:
        """x as an mx.array of shape (B, 3, H, W), H and W multiples of the patch size."""
        if isinstance(x, (str, os.PathLike)):
            raise ValueError(
                f"expected an image batch (B, 3, H, W), got the path {str(x)!r:.80}: "
                "aim_mlx.preprocess(path)[None] makes one (aim_mlx.classify takes paths)"
            )
        if not isinstance(x, mx.array):
            x = np.asarray(x)  # a numpy array or nested lists: their own dtype, checked below
        p = self.args.patch_size
        if x.ndim != 4 or x.shape[1] != 3 or any(n % p or not n for n in x.shape[2:]):
            hint = ""
            if x.ndim in (3, 4) and x.shape[-1] == 3 and x.shape[-3] != 3:  # (B,) H, W, 3
                batch = "[None]" if x.ndim == 3 else ""
                axes = "2, 0, 1" if x.ndim == 3 else "0, 3, 1, 2"
                hint = f" (channels last: x.transpose({axes}){batch})"
            elif x.ndim == 3:
                hint = " (one image: add a batch axis, x[None])"
            raise ValueError(
                f"expected input (B, 3, H, W) with H and W positive multiples of {p}, got shape "
                f"{tuple(x.shape)}{hint}"
            )
        if isinstance(x, np.ndarray):
            floating = x.dtype.kind == "f"
        else:
            floating = mx.issubdtype(x.dtype, mx.floating)
        if not floating:  # uint8 pixels, say: not normalised
            raise ValueError(
                f"expected float images (normalised as aim_mlx.preprocess does), got {x.dtype}"
            )
        return x if isinstance(x, mx.array) else mx.array(x.astype(np.float32))

    def num_parameters(self) -> int:
        """The architecture's parameter count, whatever the storage: a quantized layer counts
        its unpacked weights (not its scales and biases), as the official count does."""
        total = 0
        for _, module in self.named_modules():
            own = {k: v for k, v in module.items() if isinstance(v, mx.array)}
            if isinstance(module, nn.QuantizedLinear):
                rows, words = own.pop("weight").shape
                total += rows * words * 32 // module.bits
                own.pop("scales"), own.pop("biases", None)
            total += sum(math.prod(v.shape) for v in own.values())
        return total
