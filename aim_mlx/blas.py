"""Give MLX's Linux CPU backend an optimized BLAS.

The `mlx[cpu]` wheel links the reference BLAS, many times slower than an optimized one
(measured in README.md, "Performance"). Loading an optimized library with RTLD_GLOBAL before
`mlx.core` is first imported makes MLX's matmuls resolve to it (same results, faster).
`aim_mlx/__init__.py` calls `setup()` before anything imports `mlx.core`.

`AIM_MLX_BLAS=/path/to/lib.so` names the library, `AIM_MLX_BLAS=off` turns this off.
On macOS nothing is done: MLX uses Accelerate there.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

from .runtime import ON_VALUES, switched_off

ENV = "AIM_MLX_BLAS"
CANDIDATES = ("libopenblas.so.0", "libopenblas.so", "libopenblasp.so.0")
MAX_THREADS = 2**31 - 1  # a C int; OpenBLAS caps it at the count it was built for

_state = {"done": False, "loaded": None, "error": None, "late": False, "warned": False}


def _load(name: str) -> ctypes.CDLL:
    return ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)


def setup() -> None:
    """Load an optimized BLAS into the global symbol scope (Linux only, once)."""
    if _state["done"]:
        return
    _state["done"] = True
    if not sys.platform.startswith("linux"):
        return
    choice = os.environ.get(ENV, "").strip()
    if switched_off(ENV):
        return
    if choice.lower() in ON_VALUES:  # on, 1, yes, true: the default search, as unset
        choice = ""
    _state["late"] = "mlx.core" in sys.modules
    if _state["late"]:
        _maybe_warn()
        return
    if choice:
        _load_first([choice])
        if _state["loaded"] and _global_symbol_path("cblas_sgemm") is None:
            _state["error"] = f"{choice} loaded, but it has no cblas_sgemm: not a BLAS library"
    elif not _load_first(CANDIDATES):
        import ctypes.util  # only here: it costs as much to import as the rest of aim_mlx

        if not _load_first(filter(None, [ctypes.util.find_library("openblas")])):
            _state["error"] = None  # none installed: no AIM_MLX_BLAS library to blame
    _maybe_warn()


def _load_first(names) -> bool:
    """Load the first of `names` that loads; whether one did."""
    for name in names:
        try:
            _load(name)
        except OSError as e:
            _state["error"] = str(e)
            continue
        _state["loaded"], _state["error"] = name, None
        return True
    return False


def _global_symbol_path(symbol: str) -> str | None:
    """The file that defines `symbol` in the process's global scope, if any."""
    try:
        proc = ctypes.CDLL(None)
        addr = ctypes.cast(getattr(proc, symbol), ctypes.c_void_p).value
    except (AttributeError, OSError):
        return None

    class DlInfo(ctypes.Structure):
        _fields_ = [
            ("dli_fname", ctypes.c_char_p),
            ("dli_fbase", ctypes.c_void_p),
            ("dli_sname", ctypes.c_char_p),
            ("dli_saddr", ctypes.c_void_p),
        ]

    info = DlInfo()
    if not proc.dladdr(ctypes.c_void_p(addr), ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode())


def _openblas_config() -> str | None:
    try:
        fn = ctypes.CDLL(None).openblas_get_config
    except (AttributeError, OSError):
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode().strip()


def info() -> dict:
    """Which BLAS MLX's matmuls use: {"name", "fast", "path", "detail"}."""
    if sys.platform == "darwin":
        return {"name": "Accelerate", "fast": True, "path": None, "detail": "macOS"}
    if not sys.platform.startswith("linux"):
        return {"name": "unknown", "fast": False, "path": None, "detail": sys.platform}
    path = _global_symbol_path("cblas_sgemm")
    if path is None:
        detail = "the mlx[cpu] wheel's bundled BLAS"
        if _state["error"]:
            detail += f" ({ENV} library not used: {_state['error']})"
        elif switched_off(ENV):
            detail += f" ({ENV}=off)"
        return {"name": "reference", "fast": False, "path": None, "detail": detail}
    config = _openblas_config()
    name = "OpenBLAS" if config else os.path.basename(path)
    return {"name": name, "fast": True, "path": path, "detail": config or ""}


def set_threads(n: int | None = None) -> bool:
    """Set OpenBLAS's thread count for the calls that follow.

    None restores OpenBLAS's own count from before the first call here (from
    `OPENBLAS_NUM_THREADS` or `OMP_NUM_THREADS` as OpenBLAS reads them, else the cores).

    Returns False where the active BLAS has no such control (macOS, other libraries).
    """
    try:
        lib = ctypes.CDLL(None)
        set_count, get_count = lib.openblas_set_num_threads, lib.openblas_get_num_threads
    except (AttributeError, OSError):
        return False
    if "threads" not in _state:
        _state["threads"] = get_count()
    set_count(ctypes.c_int(min(n or _state["threads"], MAX_THREADS)))
    return True


def describe() -> str:
    """One line for `aim-mlx info` and `bench`."""
    i = info()
    parts = [i["name"]] + [p for p in (i["detail"], i["path"]) if p]
    return " | ".join(parts) if i["fast"] else f"{i['name']} (slow): {i['detail']}"


def _maybe_warn() -> None:
    if _state["warned"] or info()["fast"]:
        return
    _state["warned"] = True
    setting = f"set {ENV}=/path/to/libblas.so ({ENV}=off silences this)"
    if _state["late"]:  # the setting cannot help now: only the import order can
        how = (
            "mlx.core was imported before aim_mlx, so aim-mlx could not load an optimized BLAS; "
            f"import aim_mlx first ({ENV}=off silences this)"
        )
    elif _state["error"]:  # the library AIM_MLX_BLAS names
        how = f"{ENV} could not be used ({_state['error']}); {setting}"
    else:
        how = (
            "no optimized BLAS found; install OpenBLAS (Debian/Ubuntu: apt install "
            f"libopenblas0), or {setting}"
        )
    warnings.warn(
        f"aim-mlx: MLX's CPU matmuls use the slow reference BLAS: {how}.",
        RuntimeWarning,
        stacklevel=4,  # the line that imports aim_mlx (import machinery skipped)
    )
