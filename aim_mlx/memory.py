"""Refuse weights that cannot fit in the memory of the device that computes with them.

Weights larger than the whole memory can only make the machine swap until it stalls, or get the
process killed without a word, after minutes of downloading and converting. This check runs
before any of that, on a lower bound of the weights' size.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

from .constants import ITEMSIZE, GiB
from .errors import AimMlxError
from .runtime import check_switch, switched_off

SKIP_VARIABLE = "AIM_MLX_MEMORY_CHECK"  # "off": load whatever the size


class NotEnoughMemoryError(AimMlxError, MemoryError):
    """Weights that are larger than the device's whole memory; the message says what to do."""


def gpu_info() -> dict:
    """MLX's description of the GPU (name, memory); {} where it cannot give one."""
    try:
        return mx.device_info(mx.gpu) if hasattr(mx, "device_info") else mx.metal.device_info()
    except Exception:
        return {}


def gpu_memory(info: dict) -> int | None:
    """The GPU's memory in bytes, from `gpu_info()` (CUDA and Metal name it differently)."""
    total = info.get("total_memory") or info.get("memory_size")
    return int(total) if total else None


def device_memory() -> tuple[int | None, str]:
    """(bytes, what they are) of the memory that MLX's default device computes in: a CUDA
    GPU's own, a Mac's unified memory, or the machine's RAM; (None, "") where unknown."""
    if mx.default_device() == mx.gpu:
        total = gpu_memory(gpu_info())  # unknown: no check rather than a wrong one
        kind = "GPU memory" if mx.cuda.is_available() else "unified memory"
        return (total, kind) if total else (None, "")
    return host_memory()


def host_memory() -> tuple[int | None, str]:
    """(bytes, "memory") of the machine's RAM, where numpy arrays live; (None, "") if unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "memory"
    except (AttributeError, ValueError, OSError):
        return None, ""


def describe() -> str | None:
    """The default device's memory, as `aim-mlx info` shows it."""
    total, kind = device_memory()
    return f"{total / GiB:.1f} GiB of {kind}" if total else None


def weights_lower_bound(params: int, dtype: str, quantize_bits: int | None = None) -> int:
    """A lower bound of `params` weights' size in `dtype`, or quantized to `quantize_bits`
    (the quantized layers hold most of them; scales and the rest are left out)."""
    return params * quantize_bits // 8 if quantize_bits else params * ITEMSIZE[dtype]


def check_model(
    name: str,
    params: int,
    dtype: str,
    quantize_bits: int | None = None,
    bits_name: str = "quantize_bits",
) -> None:
    """`check_fits` for the model `name` of `params` weights in `dtype` or `quantize_bits`."""
    what = f"{name} in {f'{quantize_bits}-bit' if quantize_bits else dtype}"
    check_fits(weights_lower_bound(params, dtype, quantize_bits), what, bits_name)


def check_enabled() -> bool:
    """Whether AIM_MLX_MEMORY_CHECK leaves the check on (unset, on, 1, yes, true) or turns it
    off (off, 0, none, no, false), as every on/off setting; SettingError for anything else."""
    check_switch(SKIP_VARIABLE)
    return not switched_off(SKIP_VARIABLE)


def check_fits(nbytes: int, what: str, bits_name: str = "quantize_bits") -> None:
    """Raise NotEnoughMemoryError when `nbytes` of weights exceed the device's whole memory
    (unless AIM_MLX_MEMORY_CHECK=off). `bits_name`: the caller's argument for quantizing
    (`aim_mlx.load`'s quantize_bits, `BenchConfig`'s q_bits), which the advice names."""
    if memory := _short_of(nbytes):
        raise NotEnoughMemoryError(
            f"{what}: the weights alone take {nbytes / GiB:.1f} GiB, more than {memory}; use "
            "half precision: dtype float16 or bfloat16 (--dtype); quantize: "
            f"{bits_name} 8 or 4 (-q, --q-bits); or a smaller model ({SKIP_VARIABLE}=off to "
            "try anyway)"
        )


def check_batch_fits(nbytes: int, batch_size: int) -> None:
    """NotEnoughMemoryError when a batch's lower bound `nbytes` (weights, input and one layer's
    output) exceeds the device's memory: MLX's CPU allocator crashes when it cannot allocate."""
    if memory := _short_of(nbytes):
        raise NotEnoughMemoryError(
            f"a batch of {batch_size} images takes at least {nbytes / GiB:.1f} GiB (the weights, "
            f"the input and one layer's output), more than {memory}; use a smaller "
            f"batch_size (--batch-size); {SKIP_VARIABLE}=off to try anyway"
        )


def check_features_fit(n: int, shape: tuple[int, ...]) -> None:
    """NotEnoughMemoryError when the float32 features of `n` images of `shape` (held in the
    machine's memory until they are written) are larger than that memory."""
    nbytes = n * int(np.prod(shape, dtype=np.int64)) * 4
    if memory := _short_of(nbytes, host=True):
        raise NotEnoughMemoryError(
            f"the features of {n} images, {' x '.join(map(str, shape))} float32 each, take "
            f"{nbytes / GiB:.1f} GiB, more than {memory}: embed fewer images per run, fewer "
            f"layers (--layers), or pool 'mean' (--pool mean); {SKIP_VARIABLE}=off to try anyway"
        )


def _short_of(nbytes: int, host: bool = False) -> str | None:
    """Which memory `nbytes` exceed ("this machine's 8.0 GiB of memory"), None where they fit
    or the check is off."""
    if not check_enabled():
        return None
    total, kind = host_memory() if host else device_memory()
    if total is None or nbytes <= total:
        return None
    return f"this machine's {total / GiB:.1f} GiB of {kind}"
