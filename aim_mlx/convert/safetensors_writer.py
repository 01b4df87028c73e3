"""A streaming safetensors writer: the header first, then each tensor's bytes as it is produced.

The format is an 8-byte little-endian header length, a JSON header mapping each name to its dtype,
shape and byte range, then the raw little-endian data. Knowing every shape up front lets us write
one tensor at a time, so memory never holds more than the tensor being written.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import mlx.core as mx

DTYPE_CODES = {
    mx.float32: "F32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.uint32: "U32",
    mx.int32: "I32",
    mx.int64: "I64",
    mx.uint8: "U8",
}


def tensor_nbytes(dtype: mx.Dtype, shape: tuple[int, ...]) -> int:
    return dtype.size * math.prod(shape)


class SafetensorsWriter:
    """Write the tensors listed in `entries` [(name, dtype, shape)], in that order."""

    def __init__(self, path: str | Path, entries, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._pending = list(entries)
        header, offset = {}, 0
        for name, dtype, shape in self._pending:
            nbytes = tensor_nbytes(dtype, shape)
            header[name] = {
                "dtype": DTYPE_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, array: mx.array):
        expected_name, dtype, shape = self._pending.pop(0)
        if name != expected_name or array.dtype != dtype or tuple(array.shape) != tuple(shape):
            raise ValueError(
                f"writer expected {expected_name} {dtype} {tuple(shape)}, "
                f"got {name} {array.dtype} {tuple(array.shape)}"
            )
        view = memoryview(array)
        if not view.c_contiguous:
            view = memoryview(mx.contiguous(array))
        self._file.write(view.cast("B"))

    def close(self):
        self._file.close()
        if self._pending:
            raise ValueError(f"{self.path}: {len(self._pending)} tensors were never written")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._file.close()
        return False
