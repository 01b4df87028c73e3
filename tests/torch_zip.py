"""Write checkpoints in PyTorch's zip format without PyTorch (test and benchmark data).

The pickle is emitted opcode by opcode, the way `torch.save` writes a state dict: an OrderedDict of
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())` calls whose
storages are persistent ids `('storage', torch.FloatStorage, key, 'cpu', numel)`.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

STORAGE = {
    np.dtype("float32"): "FloatStorage",
    np.dtype("float16"): "HalfStorage",
    np.dtype("int64"): "LongStorage",
}


def _str(s: str) -> bytes:
    raw = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _int(n: int) -> bytes:
    if 0 <= n < 2**31:
        return pickle.BININT + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(raw)]) + raw


def _tuple(items) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _ordered_dict() -> bytes:
    return _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE


def state_dict_pickle(specs, storage_names=None, with_metadata=False) -> bytes:
    """specs: [(key, dtype, shape, stride, offset, storage_numel)] -> data.pkl bytes."""
    out = [pickle.PROTO + b"\x02", _ordered_dict(), pickle.MARK]
    for i, (key, dtype, shape, stride, offset, numel) in enumerate(specs):
        storage = (storage_names or STORAGE)[np.dtype(dtype)]
        pid = _tuple(
            [_str("storage"), _global("torch", storage), _str(str(i)), _str("cpu"), _int(numel)]
        )
        args = _tuple(
            [
                pid + pickle.BINPERSID,
                _int(offset),
                _tuple(_int(n) for n in shape),
                _tuple(_int(s) for s in stride),
                pickle.NEWFALSE,
                _ordered_dict(),
            ]
        )
        out += [_str(key), _global("torch._utils", "_rebuild_tensor_v2"), args, pickle.REDUCE]
    out.append(pickle.SETITEMS)
    if with_metadata:  # as torch.save writes state_dict()._metadata
        out += [pickle.EMPTY_DICT, _str("_metadata"), _ordered_dict(), pickle.SETITEM, pickle.BUILD]
    out.append(pickle.STOP)
    return b"".join(out)


def contiguous_strides(shape) -> tuple[int, ...]:
    return tuple(int(np.prod(shape[i + 1 :])) for i in range(len(shape)))


def save_torch_zip(path, tensors: dict, with_metadata=False, pickle_bytes: bytes | None = None):
    """Save {key: np.ndarray or (shape, dtype, make_array)} as a PyTorch zip checkpoint.

    A `(shape, dtype, make_array)` entry is produced only when written, so huge checkpoints are
    written one tensor at a time.
    """
    path = Path(path)
    name = path.stem
    specs, makers = [], []
    for key, t in tensors.items():
        shape, dtype, make = (t.shape, t.dtype, lambda t=t: t) if isinstance(t, np.ndarray) else t
        numel = int(np.prod(shape))
        specs.append((key, dtype, shape, contiguous_strides(shape), 0, numel))
        makers.append(make)
    data = (
        pickle_bytes if pickle_bytes is not None else state_dict_pickle(specs, None, with_metadata)
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        z.writestr(f"{name}/data.pkl", data)
        z.writestr(f"{name}/byteorder", "little")
        for i, make in enumerate(makers):
            arr = np.ascontiguousarray(make(), dtype=specs[i][1])
            with z.open(f"{name}/data/{i}", "w", force_zip64=arr.nbytes > 2**31) as f:
                f.write(arr.tobytes())
        z.writestr(f"{name}/version", "3\n")
    return path


def random_maker(shape, seed: int) -> Callable[[], np.ndarray]:
    def make():
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * 0.02

    return make
