"""Read PyTorch zip checkpoints and safetensors files without PyTorch or running pickle code.

A PyTorch checkpoint is a zip archive: `<name>/data.pkl` describes the state dict and each tensor
storage is a raw little-endian file `<name>/data/<key>`. The pickle is read by a restricted
unpickler that resolves only the handful of globals a state dict needs, replacing each with a
harmless stand-in; REDUCE and BUILD act only on those. Tensors are then read one at a time, straight
from their offset in the file.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import struct
import threading
import zipfile
import zlib
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
    if not (
        _is_count(storage_offset)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(map(_is_count, size + stride))
    ):
        raise CheckpointError(
            f"a tensor of storage {storage.key} has a damaged offset, size or stride "
            f"({_short(storage_offset)}, {_short(size)}, {_short(stride)})"
        )
    if math.prod(size) > storage.numel:  # stride-0 views: a tiny file claiming a huge tensor
        raise CheckpointError(
            f"a tensor of storage {storage.key} has {math.prod(size)} elements, more than its "
            f"storage's {storage.numel}: damaged, or not a state dict of weights"
        )
    return TensorInfo(storage, storage_offset, size, stride)


def _short(value) -> str:
    """A value's repr for a message, cut short (a hostile pickle may hold megabytes)."""
    try:
        text = repr(value)
    except RecursionError:  # nested a million deep
        return f"a {type(value).__name__} nested too deep"
    return text if len(text) <= 80 else text[:77] + "..."


def _is_count(n) -> bool:
    return type(n) is int and n >= 0


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    **{("torch", name): st for name, st in STORAGE_TYPES.items()},
}
_CALLABLE = (collections.OrderedDict, _rebuild_tensor_v2)
# What a state dict's dicts are keyed by (tensor names, "_metadata"'s module names, "version").
# Anything else is refused before it is hashed: hashing a tuple nested a million deep (3 MB of
# TUPLE1 opcodes) overflows the C stack, a crash no exception handler sees.
_KEY_TYPES = (str, int)


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
            raise UnsafePickleError(f"unexpected persistent id {_short(pid)}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, StorageType):
            raise UnsafePickleError(
                f"persistent id names an unknown storage type {_short(storage_type)}"
            )
        if not (isinstance(key, str) and _is_count(numel)):
            raise CheckpointError(f"a damaged storage entry {_short(pid)}")
        return Storage(key, storage_type.dtype, numel)

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if func not in _CALLABLE or not isinstance(args, tuple):
            raise UnsafePickleError(f"refusing REDUCE on {_short(func)}")
        if func is collections.OrderedDict and args:  # torch pickles OrderedDict(), then items
            raise UnsafePickleError("refusing REDUCE on OrderedDict with arguments")
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

    def _check_keys(self, keys):
        for key in keys:
            if type(key) not in _KEY_TYPES:
                raise UnsafePickleError(
                    f"refusing a {type(key).__name__} as a dict key or set item: a state "
                    "dict's keys are strings"
                )

    def load_setitem(self):
        self._check_keys(self.stack[-2:-1])
        pickle._Unpickler.load_setitem(self)

    def load_setitems(self):  # the items since the MARK are the stack
        self._check_keys(self.stack[::2])
        pickle._Unpickler.load_setitems(self)

    def load_dict(self):
        self._check_keys(self.stack[::2])
        pickle._Unpickler.load_dict(self)

    def load_additems(self):
        self._check_keys(self.stack)
        pickle._Unpickler.load_additems(self)

    def load_frozenset(self):
        self._check_keys(self.stack)
        pickle._Unpickler.load_frozenset(self)

    def _refuse(self):
        raise UnsafePickleError("refusing to create an object (INST/OBJ/NEWOBJ opcode)")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.DICT[0]] = load_dict
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.FROZENSET[0]] = load_frozenset
    for _op in (pickle.INST, pickle.OBJ, pickle.NEWOBJ, pickle.NEWOBJ_EX):
        dispatch[_op[0]] = _refuse
    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = lambda self: self._refuse()


def _unpickle_state_dict(data: bytes, where: str) -> dict[str, TensorInfo]:
    try:
        obj = _StateDictUnpickler(io.BytesIO(data)).load()
    except CheckpointError as e:
        raise type(e)(f"{where}: {e}") from None
    except Exception as e:
        raise CheckpointError(f"{where}: the pickle is damaged ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: holds a {type(obj).__name__}, not a state dict")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, TensorInfo):
            raise CheckpointError(f"{where}: entry {_short(key)} is not a tensor")
    return dict(obj)


# What zipfile, struct, numpy and the file system raise on a damaged or truncated archive.
_DAMAGE = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    struct.error,
    EOFError,
    OSError,
    ValueError,  # UnicodeDecodeError (a garbled name), negative seeks, bad reshapes
    KeyError,
    IndexError,
    OverflowError,
    MemoryError,
    NotImplementedError,  # a compression method or zip feature zipfile lacks
    zlib.error,
)
_AGAIN = "download or copy the file again"
CHUNK = 4 * 2**20
# The pickle takes about 100 bytes per tensor (aim-7B's backbone: some 40 KB). One larger than this
# (100 times that), stored or compressed, is refused before it is read: it is read whole, and
# unpickling takes many times its size (each 1-byte EMPTY_LIST makes a list of some 60 bytes).
MAX_PICKLE = 4 * 2**20
MAX_BYTEORDER = 16  # "little" or "big"
# How far past the file's size a compressed record may inflate (zeros deflate ~1000x); a
# stored record is bounded by the file itself.
MAX_INFLATED = 64 * 2**20


@contextlib.contextmanager
def _damage_reported(path: Path, what: str):
    """Turn any low-level error on a damaged file into one CheckpointError naming the file."""
    try:
        yield
    except CheckpointError:
        raise
    except _DAMAGE as e:
        raise CheckpointError(
            f"{path}: damaged or truncated ({what}: {type(e).__name__}: {e}); {_AGAIN}"
        ) from None


class TorchCheckpoint:
    """A PyTorch zip checkpoint, opened for reading one tensor at a time.

    Each zip record read (the pickle, each tensor storage) is checked against its CRC-32 as its
    bytes stream through, unless `verified` says the whole file's SHA-256 was already checked.
    """

    def __init__(self, path: str | Path, verified: bool = False):
        self.path = Path(path)
        self.verified = verified
        self._checked: set[str] = set()  # records whose CRC-32 matched
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            raise CheckpointError(_not_zip_reason(self.path)) from None
        except _DAMAGE as e:
            raise CheckpointError(
                f"{self.path}: a damaged zip file ({type(e).__name__}: {e}); {_AGAIN}"
            ) from None
        self._size = self.path.stat().st_size
        with _damage_reported(self.path, "zip directory"):
            names = self._zip.namelist()
        if len(set(names)) < len(names):  # readers differ on which of them they take
            twice = next(n for n, count in collections.Counter(names).items() if count > 1)
            raise CheckpointError(
                f"{self.path}: holds two records named {_short(twice)}: damaged or tampered "
                f"with; {_AGAIN}"
            )
        self._check_no_overlap()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointError(
                f"{self.path}: a zip file but not a PyTorch checkpoint (no <name>/data.pkl), "
                f"or a damaged one; {_AGAIN} if it should be one"
            )
        self._prefix = pkl[0][: -len("data.pkl")]
        byteorder = self._prefix + "byteorder"
        if byteorder in names:
            self._check_small(byteorder, MAX_BYTEORDER)
            if bytes(self._read_record(byteorder)).strip() != b"little":
                raise CheckpointError(f"{self.path}: big-endian checkpoints are not supported")
        self._check_small(pkl[0], MAX_PICKLE)
        data = self._read_record(pkl[0])
        self.tensors = _unpickle_state_dict(bytes(data), str(self.path))

    def _check_small(self, name: str, limit: int) -> None:
        """Refuse a record read whole (the pickle, the byteorder) larger than `limit` bytes,
        before reading it: stored, it could be most of a large file; compressed, a zip bomb."""
        size = self._zip.getinfo(name).file_size
        if size > limit:
            raise CheckpointError(
                f"{self.path}: its record {name} holds {size} bytes, more than the {limit} a "
                "state dict of weights could need: damaged, or not a checkpoint"
            )

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def dtype(self, key: str) -> str:
        return self.tensors[key].dtype

    def load(self, key: str) -> mx.array:
        t = self.tensors[key]
        with _damage_reported(self.path, f"tensor {key!r}"):
            return self._load(key, t)

    def _load(self, key: str, t: TensorInfo) -> mx.array:
        member = f"{self._prefix}data/{t.storage.key}"
        if member not in self._zip.NameToInfo:
            raise CheckpointError(
                f"{self.path}: tensor {key!r} has no storage {member}: a damaged or incomplete "
                f"checkpoint; {_AGAIN}"
            )
        info = self._zip.getinfo(member)
        itemsize = ITEMSIZE[t.dtype]
        if info.file_size != t.storage.numel * itemsize:
            raise CheckpointError(
                f"{self.path}: storage of {key!r} holds {info.file_size} bytes, "
                f"expected {t.storage.numel * itemsize}: damaged or truncated; {_AGAIN}"
            )
        numel = math.prod(t.shape)
        contiguous = _contiguous_strides(t.shape) == t.stride or numel <= 1
        span = _span(t.shape, t.stride) if numel else 0
        if t.offset + span > t.storage.numel:
            raise CheckpointError(
                f"{self.path}: tensor {key!r} reaches past its storage: damaged; {_AGAIN}"
            )
        count = numel if contiguous else span  # a view: the elements it spans, not its storage
        raw = self._read_record(member, t.offset * itemsize, count * itemsize)
        np_dtype = np.uint16 if t.dtype == "bfloat16" else np.dtype(t.dtype)
        arr = raw.view(np.dtype(np_dtype).newbyteorder("<"))
        if contiguous:
            arr = arr.reshape(t.shape)
        else:
            strides = [s * itemsize for s in t.stride]
            arr = np.lib.stride_tricks.as_strided(arr, t.shape, strides).copy()
        out = mx.array(arr)
        return out.view(mx.bfloat16) if t.dtype == "bfloat16" else out

    def _check_no_overlap(self):
        """Refuse records that share bytes (N of them make N times the file: a zip bomb without
        compression). A record takes at least its local header's 30 bytes, its name and its
        data; one past the end of the file is reported as such when read."""
        spans = []
        for info in self._zip.infolist():
            start = info.header_offset
            spans.append((start, start + 30 + len(info.filename) + info.compress_size, info))
        spans.sort(key=lambda span: span[:2])
        for (_, end, info), (start, _, following) in zip(spans, spans[1:], strict=False):
            if start < end <= self._size:
                raise CheckpointError(
                    f"{self.path}: records {_short(info.filename)} and "
                    f"{_short(following.filename)} overlap: damaged, or a zip bomb; {_AGAIN}"
                )

    def _read_record(self, name: str, start: int = 0, size: int | None = None) -> np.ndarray:
        """Bytes [start, start + size) of record `name`, as a uint8 array.

        Unless the file is verified, the whole record goes through its CRC-32 on the first read
        (on all cores when the record is read whole), even when only part of it is wanted (a view
        of a larger storage): a flip in the unused part still means a damaged file. Records
        already checked are not checked again.
        """
        with _damage_reported(self.path, f"record {name}"):
            info = self._zip.getinfo(name)
            if info.flag_bits & 0x1:  # zipfile would ask for a password; torch.save never encrypts
                raise CheckpointError(
                    f"{self.path}: record {name} is encrypted: damaged, or not a PyTorch "
                    f"checkpoint; {_AGAIN}"
                )
            size = info.file_size - start if size is None else size
            check = not self.verified and name not in self._checked
            if info.compress_type == zipfile.ZIP_STORED:
                out, crc = self._read_stored(info, start, size, check)
            else:  # zipfile checks the CRC itself when a record is read to its end
                out, check = self._read_compressed(info, start, size), False
            if check and crc != info.CRC:
                raise CheckpointError(
                    f"{self.path}: record {name} is corrupted (CRC-32 mismatch); {_AGAIN}"
                )
            self._checked.add(name)
            return out

    def _read_stored(self, info: zipfile.ZipInfo, start: int, size: int, check: bool):
        """(bytes [start, start + size) of a stored record, the CRC-32 of all of it if `check`
        else None)."""
        name = info.filename
        with open(self.path, "rb") as f:
            offset = self._data_offset(f, info)
            if not check:
                f.seek(offset + start)
                return self._stream(f, size, name, keep=True)[0], None
            f.seek(offset)
            if size == info.file_size:  # a whole record, the common case
                out = self._stream(f, size, name, keep=True)[0]
                return out, crc32(out)
            # part of a record (a view): the rest streams through the CRC too
            crc = self._stream(f, start, name, False, 0)[1]
            out, crc = self._stream(f, size, name, True, crc)
            crc = self._stream(f, info.file_size - start - size, name, False, crc)[1]
            return out, crc

    def _read_compressed(self, info: zipfile.ZipInfo, start: int, size: int) -> np.ndarray:
        """Bytes [start, start + size) of a compressed record, inflated to its end (where
        zipfile checks its CRC-32)."""
        name = info.filename
        if info.file_size > max(self._size, MAX_INFLATED):  # all of it is inflated
            raise CheckpointError(
                f"{self.path}: record {name} inflates to {info.file_size} bytes, more "
                f"than the whole file's {self._size}: damaged, or a zip bomb"
            )
        with self._zip.open(info) as f:
            self._stream(f, start, name, keep=False)
            out = self._stream(f, size, name, keep=True)[0]
            self._stream(f, info.file_size - start - size, name, keep=False)
        return out

    def _data_offset(self, f, info: zipfile.ZipInfo) -> int:
        """File offset of a stored record's bytes, after checking its local header and size."""
        f.seek(info.header_offset)
        header = f.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise CheckpointError(
                f"{self.path}: record {info.filename} has a damaged zip header; {_AGAIN}"
            )
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"  # as zipfile decodes names
        if f.read(name_len) != info.orig_filename.encode(encoding):
            raise CheckpointError(
                f"{self.path}: record {info.filename} has a damaged zip header (another name); "
                f"{_AGAIN}"
            )
        offset = info.header_offset + 30 + name_len + extra_len
        if info.compress_size != info.file_size or offset + info.file_size > self._size:
            raise CheckpointError(
                f"{self.path}: record {info.filename} reaches past the end of the file: "
                f"truncated or damaged; {_AGAIN}"
            )
        return offset

    def _stream(self, f, size: int, name: str, keep: bool, crc: int | None = None):
        """Read `size` bytes in chunks, updating `crc` unless it is None; (bytes if `keep`, crc)."""
        out = np.empty(size if keep else min(size, CHUNK), np.uint8)
        view, done = memoryview(out), 0
        while done < size:
            n = min(CHUNK, size - done)
            chunk = view[done : done + n] if keep else view[:n]
            got = f.readinto(chunk)
            if not got:
                raise CheckpointError(
                    f"{self.path}: truncated while reading record {name}; {_AGAIN}"
                )
            if crc is not None:
                crc = crc32(chunk[:got], crc)
            done += got
        return (out if keep else None), crc

    def close(self):
        self._zip.close()


def crc32(data, value: int = 0) -> int:
    """zlib's CRC-32, from zlib-ng's vectorised implementation where it is installed."""
    return _crc32(data, value)


try:
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; zlib gives the same values
    _crc32 = zlib.crc32


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
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    for key, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype}")
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
            raise CheckpointError(f"{path}: tensor {key!r} has damaged data_offsets {offsets!r}")
        if 8 + n + offsets[1] > size:
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


def open_checkpoint(
    path: str | Path, verified: bool = False
) -> TorchCheckpoint | SafetensorsCheckpoint:
    """Open a `.pth` / `.bin` (PyTorch zip) or `.safetensors` file by its content.

    `verified`: the file's SHA-256 was checked against a published digest, so the zip records'
    CRC-32s need not be checked again.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if head.startswith(b"PK"):
        return TorchCheckpoint(path, verified=verified)
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
    show = progress and st.st_size >= 64 * 2**20
    with tqdm(
        total=st.st_size,
        unit="B",
        unit_scale=True,
        leave=False,
        desc=f"checking {path.name}",
        disable=not show,
    ) as bar:
        digest = sha256_of(path, bar.update, stop)
    if digest is not None:
        _DIGESTS[key] = digest
    return digest


def sha256_of(path: str | Path, on_read=None, stop: threading.Event | None = None) -> str | None:
    """A file's SHA-256 hex digest, read afresh in 16 MiB chunks (`on_read(n)` after each);
    None if `stop` is set midway."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 2**20):
            if stop is not None and stop.is_set():
                return None
            digest.update(chunk)
            if on_read:
                on_read(len(chunk))
    return digest.hexdigest()
