"""Constants shared across the package: dtypes, byte units, the ImageNet evaluation transform."""

from __future__ import annotations

import mlx.core as mx

# Weight dtypes a model can be converted to or run in, and their sizes in bytes.
DTYPE_NAMES = ("float32", "float16", "bfloat16")
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
MX_DTYPES = {name: getattr(mx, name) for name in DTYPE_NAMES}


def as_dtype_name(dtype):
    """mx.float16 -> "float16"; anything else as it is (to be checked by the caller)."""
    if isinstance(dtype, mx.Dtype):
        return next((n for n, d in MX_DTYPES.items() if d == dtype), str(dtype))
    return dtype


# Byte units: GB (10^9) for file and download sizes, as the hub and disk tools show them;
# GiB (2^30) for memory figures.
GB = 10**9
MB = 10**6
GiB = 2**30
MiB = 2**20

# The upstream evaluation transform: resize the shorter side to ceil(size / CROP_RATIO), centre
# crop, then normalise with the ImageNet mean and std (RGB order).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = 0.875
