"""A streaming safetensors writer: the header first, then each tensor's bytes as it is produced.

The format is an 8-byte little-endian header length, a JSON header mapping each name to its dtype,
shape and byte range, then the raw little-endian data. Knowing every shape up front lets us write
one tensor at a time, so memory never holds more than the tensor being written.

The writer also takes the SHA-256 of every byte it writes, as it writes it (no second read of
the file): `sha256` and `size` once it is closed. The hashing runs on another thread (hashlib
releases the GIL), overlapped with producing the next tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import struct
import threading
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
    """Write the tensors listed in `entries` [(name, dtype, shape)], in that order. Once
    closed, `size` is the file's size and `sha256` the hex digest of its bytes."""

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
        self._hash = _BackgroundHash()
        self.size, self.sha256 = 0, None
        try:
            self._emit(memoryview(struct.pack("<Q", len(raw)) + raw))
        except BaseException:
            self._abort()
            raise

    def _emit(self, data: memoryview):
        self._hash.update(data)
        self._file.write(data)
        self.size += data.nbytes

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
        self._emit(view.cast("B"))

    def close(self):
        try:
            self._file.close()
        finally:
            self.sha256 = self._hash.hexdigest()  # its thread ends, whatever happened
        if self._pending:
            raise ValueError(f"{self.path}: {len(self._pending)} tensors were never written")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._abort()
        return False

    def _abort(self):
        try:
            self._file.close()  # fails again on a full disk: its buffer cannot be flushed
        finally:
            self._hash.hexdigest()  # its thread ends, releasing the last tensor it hashed


class _BackgroundHash:
    """SHA-256 of the buffers given to `update`, in order, computed on a thread of its own. At
    most `QUEUED` buffers wait (each keeps its array alive), so memory stays bounded."""

    QUEUED = 2

    def __init__(self):
        self._digest, self._error = hashlib.sha256(), None
        self._queue = queue.Queue(self.QUEUED)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while (data := self._queue.get()) is not None:
            if self._error:  # the queue is still emptied: `update` must never block
                continue
            try:
                self._digest.update(data)
            except Exception as e:
                self._error = e

    def update(self, data: memoryview):
        self._queue.put(data)

    def hexdigest(self) -> str:
        """The digest of everything given, once the thread has hashed it all."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error:
            raise self._error
        return self._digest.hexdigest()
