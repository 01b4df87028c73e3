import atexit
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

# Full float32 matmuls on a GPU (MLX's CUDA backend multiplies float32 in TF32 by default), so
# that float32 parity keeps tight bounds there too. Read when MLX starts: set before it loads.
# The CPU backend does not read it; subprocesses inherit it.
os.environ.setdefault("MLX_ENABLE_TF32", "0")
# The hub tests serve their files from 127.0.0.1 (tests/hub_server.py): an offline mode set in
# the shell (huggingface_hub reads it at import) would refuse those local downloads too.
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.pop("TRANSFORMERS_OFFLINE", None)

import signal  # noqa: E402

# The Ctrl-C tests need Python's own SIGINT handler; a script's background job starts with
# SIGINT ignored (`pytest &`).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import aim_mlx  # noqa: E402, F401  (first: it loads an optimized BLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest

# Nothing a test does reaches the user's own download cache (the locks aim-mlx keeps there
# included): the session has one of its own, removed at its end (pytest_sessionfinish), which
# the processes it starts (pytest-xdist's workers, scripts importing conftest) share. Set before
# huggingface_hub is imported (it reads these then): nothing above imports it. It still reads
# HF_HUB_CACHE's older name too.
os.environ.pop("HF_HUB_CACHE", None)
os.environ.pop("HUGGINGFACE_HUB_CACHE", None)
HF_HOME_PREFIX = "aim-mlx-tests-hf-"
OWN_HF_HOME = None
if not Path(os.environ.get("HF_HOME", "")).name.startswith(HF_HOME_PREFIX):
    OWN_HF_HOME = os.environ["HF_HOME"] = tempfile.mkdtemp(prefix=HF_HOME_PREFIX)
    # removed at exit: also where a script imports conftest outside pytest (no session end)
    atexit.register(shutil.rmtree, OWN_HF_HOME, ignore_errors=True)

REF = Path(__file__).parent / "fixtures" / "reference"
FIXTURE_CONFIG = json.loads((REF / "fixtures.json").read_text())

TF32 = os.environ.get("MLX_ENABLE_TF32", "1").strip() != "0"
TF32_BOUND = 5e-3  # float32 logits with TF32 matmuls: measured 2.0-2.7e-3 x std on an H100
# Outputs computed in half precision on a GPU against float32 ones, x std: measured on an H100
# (logits against the reference) float16 3.8-4.0e-3, bfloat16 2.7e-2.
HALF_BOUND = {"float16": 1e-2, "bfloat16": 5e-2}


def gelu64(x) -> np.ndarray:
    """Exact GELU in float64, any shape."""
    x = np.asarray(x, np.float64)
    erf = np.array([math.erf(t / math.sqrt(2.0)) for t in x.ravel()]).reshape(x.shape)
    return 0.5 * x * (1.0 + erf)


def layer_norm64(x, w, b, eps) -> np.ndarray:
    """Layer norm over the last axis in float64."""
    x, w, b = (np.asarray(a, np.float64) for a in (x, w, b))
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def gpu_available() -> bool:
    """A GPU MLX can run on (Metal or CUDA); then it is MLX's default device."""
    return mx.metal.is_available() or mx.cuda.is_available()


def float32_bound(bound: float, gpu: bool | None = None) -> float:
    """A float32 parity bound (x std) on the device the computation runs on (default: MLX's
    default device): `bound` unless float32 matmuls run in TF32 there (CUDA, TF32 on)."""
    gpu = mx.default_device() == mx.gpu if gpu is None else gpu
    return max(bound, TF32_BOUND) if gpu and TF32 and mx.cuda.is_available() else bound


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs only where MLX's default device is a GPU")


def pytest_collection_modifyitems(config, items):
    if mx.default_device() == mx.gpu:
        return
    skip = pytest.mark.skip(reason="GPU-only behaviour: MLX's default device here is the CPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def pin_cpu():
    """MLX's default device is the CPU for a module whose tests are about CPU machinery
    (conversion, caching, the CLI) rather than the device's arithmetic."""
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(previous)


def convert_fixture(out: Path, variant: str = "best", **options) -> Path:
    """The fixture checkpoint (its backbone and `variant`'s head) converted into folder `out`,
    with `aim_mlx.convert.convert`'s other `options`."""
    from aim_mlx.convert import convert

    cfg = FIXTURE_CONFIG["variants"][variant]
    return convert(out, backbone=REF / "backbone.pth", head=REF / cfg["head"], num_heads=4,
                   probe_layers=cfg["probe_layers"], progress=False, **options)  # fmt: skip


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """{(variant, dtype): folder}: the fixture converted once per test session, both heads, in
    float32, float16 and bfloat16."""
    root = tmp_path_factory.mktemp("converted")
    return {
        (variant, dtype): convert_fixture(root / f"{variant}-{dtype}", variant, dtype=dtype)
        for variant in FIXTURE_CONFIG["variants"]
        for dtype in ("float32", "float16", "bfloat16")
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The fixture converted once per test module (best head, float32), into a folder named
    aim-tiny."""
    return convert_fixture(tmp_path_factory.mktemp("model") / "aim-tiny")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A model cache of the test's own, tmp_path / "cache" (AIM_MLX_CACHE). A module takes it
    for every test with `pytestmark = pytest.mark.usefixtures("private_cache")`."""
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder the tests of a module share: its model cache (shared_cache) and what its
    module-scoped fixtures make."""
    return tmp_path_factory.mktemp("work")


@pytest.fixture
def shared_cache(workdir, monkeypatch):
    """The module's cache, workdir / "cache" (AIM_MLX_CACHE), for a test run on MLX's CPU
    stream. A module takes it with `pytestmark = pytest.mark.usefixtures("shared_cache")`."""
    monkeypatch.setenv("AIM_MLX_CACHE", str(workdir / "cache"))
    with mx.stream(mx.cpu):
        yield


def reference_weights(variant: str) -> dict:
    """The fixture's backbone + head in the MLX layout, read straight from the .pth files."""
    from aim_mlx.convert.checkpoint import open_checkpoint

    weights = {}
    for name in ("backbone.pth", FIXTURE_CONFIG["variants"][variant]["head"]):
        ckpt = open_checkpoint(REF / name)
        weights.update({k: ckpt.load(k) for k in ckpt.keys()})
    weights.pop("head.bn.num_batches_tracked")
    w = weights["preprocessor.patchifier.proj.weight"]
    weights["preprocessor.patchifier.proj.weight"] = w.transpose(0, 2, 3, 1)
    return weights


def reference_args(variant: str):
    from aim_mlx.models import ModelArgs

    probe = FIXTURE_CONFIG["variants"][variant]["probe_layers"]
    return ModelArgs.from_dict({**FIXTURE_CONFIG["config"], "probe_layers": probe})


@pytest.fixture(scope="session")
def ref_dir() -> Path:
    return REF


@pytest.fixture(params=["best", "last"])
def variant(request) -> str:
    return request.param


def build_reference_model(variant: str):
    from aim_mlx.models import AIM

    model = AIM(reference_args(variant))
    model.load_weights(list(reference_weights(variant).items()))
    return model


def pending_operations(a: mx.array) -> int:
    """How many operations MLX has still to compute for `a` (its lazy graph, as exported)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, a)
    return dot.getvalue().count("shape=rectangle")  # operations; arrays are ellipses


def nan_weights(model_dir: Path, tmp_path: Path) -> Path:
    """A copy of a converted fixture model with a NaN weight in its first block (a damaged
    file)."""
    from safetensors.numpy import load_file, save_file

    damaged = tmp_path / "damaged"
    shutil.copytree(model_dir, damaged)
    weights = load_file(damaged / "model.safetensors")
    weights["trunk.blocks.0.attn.proj.weight"][7, 3] = np.nan
    save_file(weights, damaged / "model.safetensors", metadata={"format": "mlx"})
    return damaged


def rel_err(out, ref) -> float:
    """max |out - ref| / std(ref)"""
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.abs(np.asarray(out, dtype=np.float64) - ref).max() / ref.std())


def to_np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


@pytest.fixture
def unreadable(monkeypatch):
    """Folders named `locked` cannot be listed, as after `chmod 000` (which root ignores)."""
    for name in ("scandir", "listdir"):
        real = getattr(os, name)

        def refuse(path=".", real=real):
            if os.path.basename(os.fspath(path).rstrip("/")) == "locked":
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path)

        monkeypatch.setattr(os, name, refuse)


def appears_before_publish(monkeypatch, out: Path, make) -> list:
    """Another process makes `out` (`make(out)`) just before this one moves its finished output
    there, whichever call moves it: the interleaving that checking `out` at the start misses.
    Returns a list that holds `out` once it was made."""
    import aim_mlx.output

    made = []

    def hooked(original):
        def call(src, dst, *args, **kwargs):
            if not made and Path(os.fsdecode(dst)) == out:
                made.append(out)
                make(out)
            return original(src, dst, *args, **kwargs)

        return call

    for name in ("rename", "replace", "link"):
        monkeypatch.setattr(os, name, hooked(getattr(os, name)))
    original = getattr(aim_mlx.output, "_rename_noreplace", None)  # the system's no-replace call
    if original is not None:
        monkeypatch.setattr(aim_mlx.output, "_rename_noreplace", hooked(original))
    return made


def run_cli(*args, **kwargs):
    """aim-mlx run in this process on `args` (each as str): click's test Result."""
    from click.testing import CliRunner

    from aim_mlx.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


def exited_cleanly(result, code: int):
    """`result`, after checking its exit status and that it ended with no exception but its
    exit (no traceback)."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit) if code else result.exception is None
    return result


def clean(result, code: int) -> str:
    """The result's stderr, after `exited_cleanly` (in this process a bug's traceback never
    reaches result.output: the exception is what tells it)."""
    return exited_cleanly(result, code).stderr
