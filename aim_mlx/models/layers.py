"""The layer types AIM is built from, each computing in its input's (the activations') dtype,
whatever the dtype its weights are stored in.

The linear layers also hold quantized weights, widen half-precision ones, and cut themselves
into views of their output rows (`rows`, `split`): what `ops.qkv_heads` and the CPU runner's
shards of a block (`cpu_runner.shard_block`) multiply by.
"""

from __future__ import annotations

import copy

import mlx.core as mx
import mlx.nn as nn

from . import ops


def _matmul(x: mx.array, weight: mx.array, add: mx.array | None) -> mx.array:
    """x @ weight.T, plus `add` (same shape as the result) if given: added by the matmul itself
    where `ops.fused_residual()`."""
    if add is None:
        return x @ weight.T
    return mx.addmm(add, x, weight.T) if ops.fused_residual() else add + x @ weight.T


def _rows(one_span, spans) -> nn.Module:
    """A layer computing the output features in `spans` ((start, stop) ranges), in order, from
    `one_span(start, stop)`, the layer of one range (row views of the weights)."""
    parts = [one_span(start, stop) for start, stop in spans]
    return parts[0] if len(parts) == 1 else Concatenated(parts)


def share(size: int, i: int, n: int) -> tuple[int, int]:
    """The i-th of n near-equal consecutive parts of range(size), as (start, stop)."""
    return size * i // n, size * (i + 1) // n


class Linear(nn.Linear):
    """A bias-free linear layer whose stored weights may be narrower than the activations.

    Half-precision weights used with float32 activations are widened just before the matmul
    (one layer at a time), so a small model file can still compute in float32.
    """

    def __init__(self, in_dims: int, out_dims: int):
        super().__init__(in_dims, out_dims, bias=False)

    @classmethod
    def of(cls, weight: mx.array) -> Linear:
        """A layer holding `weight` (out, in) as it is."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.weight = weight
        return layer

    def weight_as(self, dtype: mx.Dtype) -> mx.array:
        """The (out, in) weight in `dtype`: widened on the fly if stored narrower."""
        w = self.weight
        return w if w.dtype == dtype else ops.widen(w, dtype)

    def widened(self, dtype: mx.Dtype) -> Linear:
        """This layer with its weight already in `dtype` (itself if it is)."""
        return self if self.weight.dtype == dtype else Linear.of(self.weight_as(dtype))

    def rows(self, *spans: tuple[int, int]) -> nn.Module:
        """The layer that computes only the output features in `spans`, (start, stop) ranges."""
        return _rows(lambda start, stop: Linear.of(self.weight[start:stop]), spans)

    def split(self, n: int) -> list[nn.Module]:
        """n layers computing consecutive `share`s of the output features (row views)."""
        return [self.rows(share(self.weight.shape[0], j, n)) for j in range(n)]

    def __call__(self, x: mx.array, add: mx.array | None = None) -> mx.array:
        return _matmul(x, self.weight_as(x.dtype), add)

    def to_quantized(
        self, group_size: int = 64, bits: int = 8, mode: str = "affine", quantize_input=False
    ):
        if quantize_input:  # nn.quantize(..., quantize_input=True): MLX's QQLinear
            raise ValueError("AIM's linear layers quantize their weights only, not their inputs")
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class QuantizedLinear(nn.QuantizedLinear):
    """Quantized weights, multiplied by MLX's quantized kernels where `ops.quantized_kernels()`
    (Metal); elsewhere dequantized for a dense matmul in the activations' dtype (float32 on the
    CPU, where `ops.widen_low_precision()`)."""

    def weight_as(self, dtype: mx.Dtype) -> mx.array:
        """The dequantized (out, in) weight in `dtype`."""
        if self.mode == "affine":
            w = ops.dequantize_float32(
                self.weight, self.scales, self.biases, self.group_size, self.bits
            )
        else:
            w = mx.dequantize(
                self.weight, self.scales, None, self.group_size, self.bits, mode=self.mode
            )
        return w.astype(dtype)

    def widened(self, dtype: mx.Dtype) -> nn.Module:
        return Linear.of(self.weight_as(dtype)) if ops.widen_low_precision() else self

    def rows(self, *spans: tuple[int, int]) -> nn.Module:
        """The layer that computes only the output features in `spans`, (start, stop) ranges."""

        def one_span(start: int, stop: int) -> QuantizedLinear:
            layer = copy.copy(self)
            for name in ("weight", "scales", "biases"):
                if self.get(name) is not None:
                    layer[name] = self[name][start:stop]
            return layer

        return _rows(one_span, spans)

    split = Linear.split

    def __call__(self, x: mx.array, add: mx.array | None = None) -> mx.array:
        if not ops.quantized_kernels():
            return _matmul(x, self.weight_as(x.dtype), add)
        y = mx.quantized_matmul(
            x,
            self.weight,
            self.scales,
            self.get("biases"),
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        ).astype(x.dtype)
        return y if add is None else add + y

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int | None, bits: int | None, mode: str = "affine"
    ) -> QuantizedLinear:
        """`linear` quantized; None: MLX's group size or bits for `mode` (as `nn.quantize`)."""
        out_dims, in_dims = linear.weight.shape
        ql = cls(in_dims, out_dims, bias=False, group_size=group_size, bits=bits, mode=mode)
        ql.weight, ql.scales, *biases = mx.quantize(
            linear.weight, ql.group_size, ql.bits, mode=mode
        )
        ql.biases = biases[0] if biases else None  # only affine has biases
        return ql


class Concatenated(nn.Module):
    """Linear layers side by side: their outputs concatenated (`Linear.rows` of several ranges,
    which multiplies each range where it lies rather than copying them into one weight)."""

    def __init__(self, parts: list):
        super().__init__()
        self.parts = parts

    def widened(self, dtype: mx.Dtype) -> Concatenated:
        wide = [p.widened(dtype) for p in self.parts]
        same = all(w is p for w, p in zip(wide, self.parts, strict=True))
        return self if same else Concatenated(wide)

    def split(self, n: int) -> list[nn.Module]:
        """Its n parts (see `Linear.split`)."""
        if n != len(self.parts):
            raise ValueError(f"{len(self.parts)} parts cannot be split {n} ways")
        return list(self.parts)

    def __call__(self, x: mx.array, add: mx.array | None = None) -> mx.array:
        out = mx.concatenate([p(x) for p in self.parts], axis=-1)
        return out if add is None else add + out


class LayerNorm(nn.LayerNorm):
    """Layer norm in the activations' dtype, whatever the dtype of its scale and offset."""

    def __call__(self, x: mx.array) -> mx.array:
        return ops.layer_norm(x, self.weight.astype(x.dtype), self.bias.astype(x.dtype), self.eps)


class PatchConv(nn.Conv2d):
    """The patch-embedding convolution in the activations' dtype."""

    def __call__(self, x: mx.array) -> mx.array:
        w, b = self.weight.astype(x.dtype), self.bias.astype(x.dtype)
        return mx.conv2d(x, w, stride=self.stride) + b


class _Statistics(set):
    """A BatchNorm's frozen keys that keep its running statistics: MLX's `unfreeze` of a module
    above it (`model.head.unfreeze()` to fine-tune the head) clears this set directly, which
    made the statistics trainable parameters, moved by gradients and weight decay."""

    KEEP = ("running_mean", "running_var")

    def clear(self):
        super().clear()
        self.update(self.KEEP)

    def difference_update(self, *others):
        super().difference_update(*others)
        self.update(self.KEEP)


class FrozenBatchNorm(nn.BatchNorm):
    """BatchNorm with its running statistics (never trained), in the activations' dtype."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._no_grad = _Statistics(self._no_grad)

    def __call__(self, x: mx.array) -> mx.array:
        mean, var = self.running_mean.astype(x.dtype), self.running_var.astype(x.dtype)
        return (x - mean) * mx.rsqrt(var + self.eps)
