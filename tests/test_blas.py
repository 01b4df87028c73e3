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


@needs_openblas
def test_on_searches_as_unset():
    """on (1, yes, true), as every on/off setting takes it: the default search, not a file."""
    for value in ("on", "1", "TRUE"):
        r = probe(blas_env=value)
        assert r["info"]["name"] == "OpenBLAS" and r["warnings"] == []


def test_a_library_that_is_not_a_blas_is_named():
    """A library that loads but has no cblas_sgemm: the warning and `info` say so (not "no
    optimized BLAS found; install OpenBLAS")."""
    r = probe(blas_env="libm.so.6")
    assert not r["info"]["fast"] and "libm.so.6" in r["info"]["detail"]
    assert len(r["warnings"]) == 1
    assert "libm.so.6 loaded, but it has no cblas_sgemm" in r["warnings"][0]
    assert "install OpenBLAS" not in r["warnings"][0]


THREADS = """
import ctypes, json
import aim_mlx
from aim_mlx import blas
count = ctypes.CDLL(None).openblas_get_num_threads
own = count()
blas.set_threads(1)
one = count()
blas.set_threads(None)
restored = count()
blas.set_threads(10**20)  # AIM_MLX_CPU_CORES of any size: OpenBLAS caps it
print(json.dumps([own, one, restored]))
"""


@needs_openblas
@pytest.mark.parametrize(
    "env",
    [{"OPENBLAS_NUM_THREADS": "abc"}, {"OPENBLAS_NUM_THREADS": "1.5"}, {"OMP_NUM_THREADS": "1"}],
)
def test_default_threads_are_openblas_own(env):
    """set_threads(None) restores the count OpenBLAS chose from its environment variables (it
    ignores a value it cannot read; OMP_NUM_THREADS counts too), without failing on them."""
    base = {k: v for k, v in os.environ.items() if "NUM_THREADS" not in k}
    out = subprocess.run(
        [sys.executable, "-c", THREADS], env={**base, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    own, one, restored = json.loads(out.stdout)
    assert one == 1 and restored == own


def test_the_warning_points_at_the_users_import(tmp_path):
    """The import that loaded aim_mlx, where a filter by module or line can take it (not a line
    inside aim_mlx/__init__.py)."""
    script = tmp_path / "user.py"
    script.write_text("import os\nimport aim_mlx\n")
    env = {**os.environ, "AIM_MLX_BLAS": str(tmp_path / "nope.so")}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr.startswith(f"{script}:2: RuntimeWarning: aim-mlx")


NO_OPENBLAS = """
import ctypes, ctypes.util, json, warnings
real = ctypes.CDLL
class Hidden(real):  # as on a machine without OpenBLAS
    def __init__(self, name, *args, **kwargs):
        if name and "openblas" in str(name):
            raise OSError(f"{name}: cannot open shared object file")
        super().__init__(name, *args, **kwargs)
ctypes.CDLL = Hidden
ctypes.util.find_library = lambda name: None
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import aim_mlx
print(json.dumps({"info": aim_mlx.blas.info(), "warnings": [str(w.message) for w in caught]}))
"""


@pytest.mark.parametrize("blas_env", [None, "on"])
def test_no_openblas_installed_says_so(blas_env):
    """Without OpenBLAS, and AIM_MLX_BLAS unset: install it, says the warning, and `info` does
    not blame an AIM_MLX_BLAS library (it named the last file it looked for)."""
    r = json.loads(run(NO_OPENBLAS, blas_env=blas_env))
    assert r["info"]["detail"] == "the mlx[cpu] wheel's bundled BLAS"
    assert len(r["warnings"]) == 1 and "install OpenBLAS" in r["warnings"][0]
