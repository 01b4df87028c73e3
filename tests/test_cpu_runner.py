"""The CPU runner: splitting the batch or the tokens over CPU streams changes nothing but where
the work runs. Pinned to the CPU, where the runner is used."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import REF, build_reference_model, rel_err, to_np

from aim_mlx.models import cpu_runner

pytestmark = pytest.mark.usefixtures("pin_cpu")


def spy_on_streams(monkeypatch) -> list:
    """Record the stream every block step is built on."""
    from aim_mlx.models.aim import Block

    seen = []
    for name in ("__call__", "queries_keys_values"):
        original = getattr(Block, name)

        def spy(self, x, *rest, _original=original, _name=name):
            seen.append((_name, str(mx.default_stream(mx.cpu)), x.shape))
            return _original(self, x, *rest)

        monkeypatch.setattr(Block, name, spy)
    return seen


@pytest.mark.parametrize("batch", [2, 3])
def test_batch_split_over_cpu_streams(monkeypatch, batch):
    model = build_reference_model("last")
    x = mx.random.normal((batch, 3, 224, 224), key=mx.random.key(7))
    monkeypatch.setenv("AIM_MLX_CPU_STREAMS", "1")
    whole = to_np(model(x))
    one_by_one = np.concatenate([to_np(model(x[i : i + 1])) for i in range(batch)])
    monkeypatch.setenv("AIM_MLX_CPU_STREAMS", "2")
    seen = spy_on_streams(monkeypatch)
    split = to_np(model(x))
    # Every block ran on two streams, on the batch's two shares (uneven for 3: 1 + 2).
    calls = [s for s in seen if s[0] == "__call__"]  # whole blocks, not token steps
    assert len(calls) == 2 * 8 and len({s[1] for s in calls}) == 2
    assert sorted({s[2][0] for s in calls}) == sorted({batch // 2, batch - batch // 2})
    assert split.shape == (batch, 1000)
    # Only float32 rounding differs (matmuls of other shapes): far below the 1e-4 parity bound.
    assert rel_err(split, whole) <= 1e-5 and rel_err(split, one_by_one) <= 1e-5


def test_token_split_for_one_image(monkeypatch):
    """One image: the tokens over two CPU streams give the same features and logits, whether
    through `model(x)` or `extract_features`."""
    model = build_reference_model("best")
    x = mx.array(np.load(REF / "input_252x196.npy"))  # 18 x 14 patches: 252 tokens
    ref = np.load(REF / "logits_best_252x196.npy")
    monkeypatch.setenv("AIM_MLX_CPU_STREAMS", "1")
    whole = model.extract_features(x, max_block_id=-1)
    monkeypatch.setenv("AIM_MLX_CPU_STREAMS", "2")
    seen = spy_on_streams(monkeypatch)
    split = model.extract_features(x, max_block_id=-1)
    assert {s[0] for s in seen} == {"queries_keys_values"}  # token steps, not whole blocks
    assert len(seen) == 2 * 8 and {s[2][1] for s in seen} == {126}
    assert len({s[1] for s in seen}) == 2
    seen.clear()
    logits = to_np(model(x))
    assert {s[0] for s in seen} == {"queries_keys_values"} and len(seen) == 2 * 7
    assert len(split) == len(whole) == 8
    for a, b in zip(split, whole, strict=True):
        assert a.shape == b.shape and rel_err(to_np(a), to_np(b)) <= 1e-5
    assert rel_err(logits, ref) <= 1e-4


@pytest.mark.parametrize("quantize", [False, True], ids=["float16", "4-bit"])
def test_narrow_weights_widened_once_per_block(monkeypatch, quantize):
    """Half-precision or quantized weights: widened once per block for both streams, and the
    split forward equals the one-stream forward."""
    import mlx.nn as nn

    from aim_mlx.models.aim import Linear

    model = build_reference_model("best")
    model.set_dtype(mx.float16)
    if quantize:
        nn.quantize(
            model,
            group_size=32,
            bits=4,
            class_predicate=lambda p, m: ".blocks." in p and isinstance(m, Linear),
        )
    x = mx.random.normal((2, 3, 224, 224), key=mx.random.key(8))
    monkeypatch.setenv("AIM_MLX_CPU_STREAMS", "1")
    whole = to_np(model(x))
    widened = []
    original = Linear.of.__func__

    def count(cls, weight):
        widened.append(weight.shape)
        return original(cls, weight)

    monkeypatch.setattr(Linear, "of", classmethod(count))
    monkeypatch.setenv("AIM_MLX_CPU_STREAMS", "2")
    split = to_np(model(x))
    assert len(widened) == 4 * 7  # qkv, proj, fc1, fc2 of blocks 0..6, once each
    assert rel_err(split, whole) <= 1e-5


def test_blas_threads_divide_the_cores(monkeypatch):
    from aim_mlx import blas

    calls = []
    monkeypatch.setattr(blas, "set_threads", lambda n=None: calls.append(n) or True)
    model = build_reference_model("best")
    x = mx.zeros((2, 3, 224, 224))
    for cores, streams, expected in (("4", "2", 2), ("4", "1", 4), ("1", None, 1)):
        monkeypatch.setenv("AIM_MLX_CPU_CORES", cores)
        if streams:
            monkeypatch.setenv("AIM_MLX_CPU_STREAMS", streams)
        else:
            monkeypatch.delenv("AIM_MLX_CPU_STREAMS", raising=False)
        model.extract_features(x)
        assert calls[-1] == expected
    assert cpu_runner.streams() == 1  # one core: no split by default


@pytest.fixture
def cache_limit():
    """Run with MLX's default CPU buffer cache (32 MB) and aim-mlx's raise not yet done; restore
    both afterwards. Yields a function that runs the blocks and returns the limit then set."""
    from aim_mlx.models.aim import ModelArgs, Trunk

    blocks = Trunk(ModelArgs(embed_dim=64, num_blocks=1, num_heads=4, probe_layers=(0,))).blocks
    before = mx.set_cache_limit(32 << 20)
    cpu_runner._raise_cache_limit.cache_clear()

    def limit_after_forward() -> int:
        mx.eval(cpu_runner.run_blocks(blocks, mx.zeros((1, 4, 64))))
        limit = mx.set_cache_limit(32 << 20)
        mx.set_cache_limit(limit)
        return limit

    yield limit_after_forward
    mx.set_cache_limit(before)
    cpu_runner._raise_cache_limit.cache_clear()


@pytest.mark.parametrize(
    "setting, expected_mb",
    [(None, cpu_runner.CACHE_MB), ("2048", 2048), ("16", 32), ("off", 32)],
)
def test_buffer_cache_raised_once(monkeypatch, cache_limit, setting, expected_mb):
    """The first forward pass raises MLX's buffer cache limit (never lowers it); `off` keeps
    MLX's own."""
    if setting is None:
        monkeypatch.delenv(cpu_runner.CACHE_ENV, raising=False)
    else:
        monkeypatch.setenv(cpu_runner.CACHE_ENV, setting)
    assert cache_limit() == expected_mb << 20
    mx.set_cache_limit(8 << 20)  # a user's own setting after the first forward pass stays
    assert cache_limit() == 8 << 20


def test_buffer_cache_shown_by_info(monkeypatch):
    from aim_mlx import bench

    monkeypatch.delenv(cpu_runner.CACHE_ENV, raising=False)
    shown = bench.environment()["cpu_buffer_cache"]
    assert shown == "at least 1024 MB, from the first forward pass"
    monkeypatch.setenv(cpu_runner.CACHE_ENV, "off")
    assert bench.environment()["cpu_buffer_cache"] == "MLX's own (AIM_MLX_CPU_CACHE_MB=off)"


def test_buffer_cache_setting_checked(monkeypatch, cache_limit):
    from aim_mlx.errors import OptionError

    monkeypatch.setenv(cpu_runner.CACHE_ENV, "1GB")
    with pytest.raises(OptionError, match="AIM_MLX_CPU_CACHE_MB='1GB': expected a whole number"):
        cache_limit()
