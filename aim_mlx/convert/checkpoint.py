"""Read PyTorch zip checkpoints and safetensors files without PyTorch or running pickle code.

A PyTorch checkpoint is a zip archive: `<name>/data.pkl` describes the state dict and each tensor
storage is a raw little-endian file `<name>/data/<key>`. The pickle is read by a restricted
unpickler that resolves only the handful of globals a state dict needs, replacing each with a
harmless stand-in; REDUCE and BUILD act only on those. Tensors are then read one at a time, straight
from their offset in the file.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import os
import pickle
import struct
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import AimMlxError


class CheckpointError(AimMlxError, ValueError):
    """A file that is not a readable, safe checkpoint."""


class UnsafePickleError(CheckpointError):
    """The pickle asks for something outside the state-dict allowlist."""


@dataclass(frozen=True)
class StorageType:
    name: str
    dtype: str  # numpy / mlx dtype name


STORAGE_TYPES = {
    "FloatStorage": StorageType("FloatStorage", "float32"),
    "HalfStorage": StorageType("HalfStorage", "float16"),
    "BFloat16Storage": StorageType("BFloat16Storage", "bfloat16"),
    "LongStorage": StorageType("LongStorage", "int64"),
}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "uint32": 4}


@dataclass(frozen=True)
class Storage:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its storage, offset (elements), shape and strides."""

    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.storage.dtype


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None
):
    if not isinstance(storage, Storage):
        raise UnsafePickleError("_rebuild_tensor_v2 called on something that is not a storage")
    return TensorInfo(storage, int(storage_offset), tuple(size), tuple(stride))


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    **{("torch", name): st for name, st in STORAGE_TYPES.items()},
}
_CALLABLE = (collections.OrderedDict, _rebuild_tensor_v2)


class _StateDictUnpickler(pickle._Unpickler):
    """Pure-Python unpickler with an allowlist of globals and guarded REDUCE / BUILD."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global '{module}.{name}': a state dict of tensors only needs "
                "collections.OrderedDict, torch._utils._rebuild_tensor_v2 and torch.*Storage; "
                "this file may run code when loaded by PyTorch"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, StorageType):
            raise UnsafePickleError(f"persistent id names an unknown storage type {storage_type!r}")
        return Storage(str(key), storage_type.dtype, int(numel))

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if func not in _CALLABLE or not isinstance(args, tuple):
            raise UnsafePickleError(f"refusing REDUCE on {func!r}")
        self.stack[-1] = func(*args)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if not (
            isinstance(inst, collections.OrderedDict)
            and isinstance(state, dict)
            and set(state) <= {"_metadata"}
        ):
            raise UnsafePickleError(f"refusing BUILD on {type(inst).__name__}")
        inst.__dict__.update(state)

    def _refuse(self):
        raise UnsafePickleError("refusing to create an object (INST/OBJ/NEWOBJ opcode)")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
    for _op in (pickle.INST, pickle.OBJ, pickle.NEWOBJ, pickle.NEWOBJ_EX):
        dispatch[_op[0]] = _refuse
    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = lambda self: self._refuse()


def _unpickle_state_dict(data: bytes, where: str) -> dict[str, TensorInfo]:
    try:
        obj = _StateDictUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{where}: {e}") from None
    except Exception as e:
        raise CheckpointError(f"{where}: the pickle is damaged ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: holds a {type(obj).__name__}, not a state dict")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, TensorInfo):
            raise CheckpointError(f"{where}: entry {key!r} is not a tensor")
    return dict(obj)


def _stored_offset(fp, info: zipfile.ZipInfo) -> int:
    """File offset of an uncompressed zip member's data."""
    fp.seek(info.header_offset)
    header = fp.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError("damaged zip member header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


class TorchCheckpoint:
    """A PyTorch zip checkpoint, opened for reading one tensor at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            raise CheckpointError(_not_zip_reason(self.path)) from None
        pkl = [n for n in self._zip.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointError(
                f"{self.path}: a zip file but not a PyTorch checkpoint (no <name>/data.pkl)"
            )
        self._prefix = pkl[0][: -len("data.pkl")]
        names = set(self._zip.namelist())
        byteorder = self._prefix + "byteorder"
        if byteorder in names and self._zip.read(byteorder).strip() != b"little":
            raise CheckpointError(f"{self.path}: big-endian checkpoints are not supported")
        try:
            data = self._zip.read(pkl[0])
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{self.path}: damaged or truncated ({e})") from None
        self.tensors = _unpickle_state_dict(data, str(self.path))

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def dtype(self, key: str) -> str:
        return self.tensors[key].dtype

    def load(self, key: str) -> mx.array:
        t = self.tensors[key]
        member = f"{self._prefix}data/{t.storage.key}"
        try:
            info = self._zip.getinfo(member)
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {key!r} has no storage {member}") from None
        itemsize = ITEMSIZE[t.dtype]
        if info.file_size != t.storage.numel * itemsize:
            raise CheckpointError(
                f"{self.path}: storage of {key!r} holds {info.file_size} bytes, "
                f"expected {t.storage.numel * itemsize}"
            )
        numel = math.prod(t.shape)
        contiguous = _contiguous_strides(t.shape) == t.stride or numel <= 1
        start, count = (t.offset, numel) if contiguous else (0, t.storage.numel)
        if numel and (t.offset + _span(t.shape, t.stride) > t.storage.numel):
            raise CheckpointError(f"{self.path}: tensor {key!r} reaches past its storage")
        raw = self._read(info, start * itemsize, count * itemsize, key)
        np_dtype = np.uint16 if t.dtype == "bfloat16" else np.dtype(t.dtype)
        arr = np.frombuffer(raw, dtype=np.dtype(np_dtype).newbyteorder("<"))
        if contiguous:
            arr = arr.reshape(t.shape)
        else:
            arr = np.lib.stride_tricks.as_strided(
                arr[t.offset :], t.shape, [s * itemsize for s in t.stride]
            ).copy()
        out = mx.array(arr)
        return out.view(mx.bfloat16) if t.dtype == "bfloat16" else out

    def _read(self, info: zipfile.ZipInfo, start: int, size: int, key: str) -> bytes:
        if info.compress_type == zipfile.ZIP_STORED:
            with open(self.path, "rb") as f:
                f.seek(_stored_offset(f, info) + start)
                raw = f.read(size)
        else:
            with self._zip.open(info) as f:
                f.seek(start)
                raw = f.read(size)
        if len(raw) != size:
            raise CheckpointError(f"{self.path}: truncated while reading tensor {key!r}")
        return raw

    def close(self):
        self._zip.close()


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def _span(shape, stride) -> int:
    return 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))


_SAFETENSORS_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "U32": "uint32",
}


class SafetensorsCheckpoint:
    """A safetensors file, read one tensor at a time."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        self._header, self._data_start = _safetensors_header(self.path)
        try:
            self._file = safe_open(str(self.path), framework="numpy")
        except Exception as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def dtype(self, key: str) -> str:
        return _SAFETENSORS_DTYPES[self._header[key]["dtype"]]

    def load(self, key: str) -> mx.array:
        if self.dtype(key) == "bfloat16":  # numpy has no bfloat16: read the raw bits
            begin, end = self._header[key]["data_offsets"]
            with open(self.path, "rb") as f:
                f.seek(self._data_start + begin)
                raw = np.frombuffer(f.read(end - begin), dtype="<u2")
            return mx.array(raw.reshape(self.shape(key))).view(mx.bfloat16)
        return mx.array(self._file.get_tensor(key))

    def close(self):
        pass


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """The tensor entries of a safetensors header, and the file offset where the data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, 100_000_000):
            raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    header.pop("__metadata__", None)
    for key, entry in header.items():
        if entry.get("dtype") not in _SAFETENSORS_DTYPES:
            dtype = entry.get("dtype")
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype}")
        if 8 + n + entry["data_offsets"][1] > size:
            raise CheckpointError(f"{path}: truncated (tensor {key!r} reaches past the end)")
    return header, 8 + n


_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _not_zip_reason(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return f"{path}: the file is empty"
    if head.startswith(_LEGACY_MAGIC) or head.startswith(b"\x80\x02"):
        return (
            f"{path}: a PyTorch checkpoint in the legacy (pre-1.6, non-zip) format, which is not "
            "supported; re-save it with torch.save(...) from PyTorch 1.6 or newer"
        )
    if head.startswith(b"PK"):
        return f"{path}: a damaged or truncated zip file (was the download interrupted?)"
    return f"{path}: not a PyTorch checkpoint (.pth / .bin zip) or safetensors file"


def open_checkpoint(path: str | Path) -> TorchCheckpoint | SafetensorsCheckpoint:
    """Open a `.pth` / `.bin` (PyTorch zip) or `.safetensors` file by its content."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK"):
        return TorchCheckpoint(path)
    if len(head) == 8 and path.suffix == ".safetensors":
        return SafetensorsCheckpoint(path)
    if len(head) == 8 and head[:1] != b"\x80":
        try:
            _safetensors_header(path)
            return SafetensorsCheckpoint(path)
        except CheckpointError:
            pass
    raise CheckpointError(_not_zip_reason(path))


_DIGESTS: dict[tuple, str] = {}


def file_sha256(path: str | Path, *, progress: bool = False, stop: threading.Event | None = None):
    """A file's SHA-256 hex digest (None if `stop` is set midway).

    Remembered for this process per (path, size, mtime), so a file checked after its download
    is not read again for the converter's record.
    """
    from tqdm import tqdm

    path = Path(path)
    st = path.stat()
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = hashlib.sha256()
    show = progress and st.st_size >= 64 * 2**20
    with (
        open(path, "rb") as f,
        tqdm(
            total=st.st_size,
            unit="B",
            unit_scale=True,
            leave=False,
            desc=f"checking {path.name}",
            disable=not show,
        ) as bar,
    ):
        while chunk := f.read(16 * 2**20):
            if stop is not None and stop.is_set():
                return None
            digest.update(chunk)
            bar.update(len(chunk))
    _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]
