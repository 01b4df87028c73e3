"""The optimized-BLAS preload: each case runs in a fresh interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

REF = Path(__file__).parent / "fixtures" / "reference"

PROBE = """
import json, sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    if "early" in sys.argv:
        import mlx.core
    import aim_mlx
    from aim_mlx import blas
    blas.setup()  # a second call does nothing
print(json.dumps({"info": blas.info(), "warnings": [str(w.message) for w in caught]}))
"""

# The same matmul and the fixture model's logits, written to an .npz.
COMPUTE = """
import sys
import aim_mlx
import mlx.core as mx
import numpy as np
sys.path.insert(0, sys.argv[2])
from conftest import REF, build_reference_model
a = mx.random.normal((300, 700), key=mx.random.key(0))
b = mx.random.normal((700, 500), key=mx.random.key(1))
x = mx.array(np.load(REF / "input.npy"))
logits = np.array(build_reference_model("best")(x))
np.savez(sys.argv[1], mm=np.array(a @ b), logits=logits, fast=aim_mlx.blas.info()["fast"])
"""


def have_openblas() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libopenblas.so.0")
    except OSError:
        return False
    return True


def run(code: str, *args: str, blas_env: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "AIM_MLX_BLAS"}
    if blas_env is not None:
        env["AIM_MLX_BLAS"] = blas_env
    out = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout


def probe(*args: str, blas_env: str | None = None) -> dict:
    return json.loads(run(PROBE, *args, blas_env=blas_env))


needs_openblas = pytest.mark.skipif(not have_openblas(), reason="libopenblas0 is not installed")


@needs_openblas
def test_openblas_is_loaded_by_default():
    r = probe()
    assert r["info"]["fast"] and r["info"]["name"] == "OpenBLAS"
    assert "openblas" in r["info"]["path"].lower()
    assert r["warnings"] == []


@needs_openblas
def test_library_named_by_env():
    import ctypes.util

    path = ctypes.util.find_library("openblas") or "libopenblas.so.0"
    r = probe(blas_env=path)
    assert r["info"]["name"] == "OpenBLAS" and r["warnings"] == []


def test_off_uses_the_wheel_blas_silently():
    r = probe(blas_env="off")
    assert r["info"] == {
        "name": "reference",
        "fast": False,
        "path": None,
        "detail": "the mlx[cpu] wheel's bundled BLAS (AIM_MLX_BLAS=off)",
    }
    assert r["warnings"] == []


def test_missing_library_warns_once(tmp_path):
    r = probe(blas_env=str(tmp_path / "nope.so"))
    assert not r["info"]["fast"]
    assert len(r["warnings"]) == 1
    assert "nope.so" in r["warnings"][0] and "AIM_MLX_BLAS" in r["warnings"][0]


def test_mlx_imported_first_warns_once():
    r = probe("early")
    assert not r["info"]["fast"]
    assert len(r["warnings"]) == 1
    assert "import aim_mlx first" in r["warnings"][0]
    assert "/path/to/libblas.so" not in r["warnings"][0]  # too late for the setting to help


def test_import_aim_mlx_does_not_import_mlx():
    out = run("import sys, aim_mlx; print('mlx.core' in sys.modules)")
    assert out.strip() == "False"


@needs_openblas
def test_results_unchanged(tmp_path):
    """OpenBLAS and the wheel's reference BLAS give the same matmul and model outputs."""
    tests = str(Path(__file__).parent)
    run(COMPUTE, str(tmp_path / "fast.npz"), tests)
    run(COMPUTE, str(tmp_path / "ref.npz"), tests, blas_env="off")
    import numpy as np

    fast, ref = np.load(tmp_path / "fast.npz"), np.load(tmp_path / "ref.npz")
    assert fast["fast"] and not ref["fast"]  # two different BLAS libraries really ran
    # Only the summation order may differ: float32 rounding, far below the 1e-4 x std bound.
    assert np.abs(fast["mm"] - ref["mm"]).max() <= 1e-4 * np.abs(ref["mm"]).max()
    logits = np.load(REF / "logits_best.npy")
    assert np.abs(fast["logits"] - ref["logits"]).max() <= 1e-5 * logits.std()
