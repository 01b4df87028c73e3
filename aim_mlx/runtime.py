"""MLX settings that aim-mlx applies before `mlx.core` is first imported.

MLX's GPU backends (Metal and CUDA) group operations into command buffers (CUDA graphs) and
keep every input of a buffer's operations alive until the buffer has finished on the GPU; up to
ten committed buffers may be in flight. How much one buffer may hold therefore decides the
forward pass's peak memory. MLX reads that limit from the environment, once per process, when
its first GPU stream is created (there is no `mx.*` function for it): `MLX_MAX_MB_PER_BUFFER`
(and `MLX_MAX_OPS_PER_BUFFER`). On Metal its defaults are small (40-50 MB, by chip); on CUDA
they are large (1000 MB on an H100), and the activations then cost several times the
weights. So on Linux aim-mlx sets `MLX_MAX_MB_PER_BUFFER` (default below, a little under Metal's)
unless it is set already; MLX's CPU backend does not read it. Where and why:
benchmarks/README.md, "GPU memory".

`MLX_MAX_MB_PER_BUFFER=N` set by the user wins; `AIM_MLX_BUFFER_LIMIT=off` keeps MLX's own
defaults. `aim_mlx/__init__.py` calls `setup()` before anything imports `mlx.core`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path

BUFFER_ENV = "MLX_MAX_MB_PER_BUFFER"
OFF_ENV = "AIM_MLX_BUFFER_LIMIT"
BUFFER_MB = 32  # chosen from the H100 lever tables: benchmarks/README.md, "GPU memory"
TF32_ENV = "MLX_ENABLE_TF32"

_state = {"done": False, "source": None, "late": False}


OFF_VALUES = ("off", "0", "none", "false", "no")
ON_VALUES = ("", "on", "1", "true", "yes")


def switched_off(name: str) -> bool:
    """Whether environment variable `name` turns something off: off, 0, none, no or false."""
    return os.environ.get(name, "").strip().lower() in OFF_VALUES


def check_switch(name: str) -> None:
    """SettingError unless environment variable `name` is unset, on or off (and synonyms)."""
    from .errors import SettingError

    value = os.environ.get(name, "")
    if value.strip().lower() not in OFF_VALUES + ON_VALUES:
        raise SettingError(
            f"{name}={value!r}: expected off (or 0, no, false) or on (the default; 1, yes, true)"
        )


def check_settings() -> None:
    """SettingError for the first AIM_MLX_* setting whose value is not one it takes (the command
    line and `aim_mlx.load` check them before any work). AIM_MLX_BLAS is read at import instead,
    AIM_MLX_CACHE and AIM_MLX_REGISTRY when they are used."""
    from . import distributed, memory, transforms
    from .models import cpu_runner, ops

    cpu_runner.cores(), cpu_runner.streams(), cpu_runner.cache_mb()
    check_switch(OFF_ENV)
    check_switch(ops.CUDA_KERNELS_ENV)
    memory.check_enabled()
    distributed.peer_wait()
    transforms.apply_pixel_limit()


def _off() -> bool:
    return switched_off(OFF_ENV)


def setup() -> None:
    """Bound MLX's GPU command buffers on Linux (the CUDA backend), once per process."""
    if _state["done"]:
        return
    _state["done"] = True
    if not sys.platform.startswith("linux"):
        _state["source"] = "mlx"  # Metal's own limits are already small
        return
    if os.environ.get(BUFFER_ENV, "").strip():
        _state["source"] = "user"
        return
    if _off():
        _state["source"] = "mlx"
        return
    os.environ[BUFFER_ENV] = str(BUFFER_MB)
    _state["source"] = "aim-mlx"
    _state["late"] = "mlx.core" in sys.modules
    if _state["late"] and _cuda_backend():
        # MLX may already have created its GPU stream, and read the limit with it.
        warnings.warn(
            f"aim-mlx: mlx.core was imported before aim_mlx, so {BUFFER_ENV}={BUFFER_MB} may come "
            f"too late and the GPU keep MLX's larger command buffers (several times the peak "
            f"memory); import aim_mlx first, or set {BUFFER_ENV} in the environment.",
            RuntimeWarning,
            stacklevel=4,  # the line that imports aim_mlx (import machinery skipped)
        )


def check_backend() -> None:
    """On Linux, MLX without a backend (`pip install aim-mlx` with no extra) cannot load:
    say which install command fixes it, instead of MLX's "libmlx.so: cannot open" later."""
    if not sys.platform.startswith("linux"):
        return
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return  # no MLX at all: importing it says so
    folders = spec.submodule_search_locations
    if not any((Path(p) / "lib" / "libmlx.so").exists() for p in folders):
        if installed := _backend_distributions(folders):  # its library removed with another backend
            names = " ".join(installed)
            raise ImportError(
                f"aim-mlx: MLX's library (libmlx.so) is missing, though {names} is installed "
                "(uninstalling another MLX backend removes the file they share). Put it back: "
                f"pip install --force-reinstall --no-deps {names}"
            )
        raise ImportError(
            "aim-mlx: MLX is installed without a backend (no libmlx.so in the mlx package). "
            'Install one: pip install "aim-mlx[cpu]" (CPU), "aim-mlx[cuda]" (NVIDIA GPU, CUDA 13) '
            'or "aim-mlx[cuda12]" (CUDA 12); from a source tree: pip install ".[cpu]".'
        )


def _backend_distributions(folders) -> list[str]:
    """The MLX backend packages (mlx-cpu, mlx-cuda-13, ...) installed beside this `mlx`."""
    from importlib.metadata import distributions

    here = {Path(p).resolve() for p in folders}
    names = set()
    for d in distributions():
        name = (d.metadata["Name"] or "").lower()
        backend = name == "mlx-cpu" or name.startswith("mlx-cuda")
        if backend and Path(d.locate_file("mlx")).resolve() in here:
            names.add(name)
    return sorted(names)


def _cuda_backend() -> bool:
    mx = sys.modules.get("mlx.core")
    return bool(mx is not None and mx.cuda.is_available())


def describe() -> str:
    """One line for `aim-mlx info`: the GPU command-buffer limit and float32 matmul precision."""
    value = os.environ.get(BUFFER_ENV, "").strip()
    if sys.platform.startswith("linux") and value:
        limit = f"{BUFFER_ENV}={value} ({_state['source'] or 'user'})"
    else:
        limit = "MLX's default"
    tf32 = "off" if os.environ.get(TF32_ENV, "").strip() == "0" else "MLX's default (on)"
    return f"command buffer: {limit}; float32 matmuls TF32: {tf32}"
