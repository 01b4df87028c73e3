import json
from pathlib import Path

import aim_mlx  # noqa: F401  (first: it loads an optimized BLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest

REF = Path(__file__).parent / "fixtures" / "reference"
FIXTURE_CONFIG = json.loads((REF / "fixtures.json").read_text())


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


@pytest.fixture
def cpu_device():
    """MLX's default device set to the CPU for one test (tests of CPU-only machinery)."""
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


@pytest.fixture(params=["best", "last"])
def variant(request) -> str:
    return request.param


def build_reference_model(variant: str):
    from aim_mlx.models import AIM

    model = AIM(reference_args(variant))
    model.load_weights(list(reference_weights(variant).items()))
    return model


def rel_err(out, ref) -> float:
    """max |out - ref| / std(ref)"""
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.abs(np.asarray(out, dtype=np.float64) - ref).max() / ref.std())


def to_np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))
