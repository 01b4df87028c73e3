"""The CPU runner: splitting the batch, or every block's work, over CPU streams changes nothing
but where the work runs. Pinned to the CPU, where the runner is used."""

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import REF, build_reference_model, convert_fixture, rel_err, to_np

from aim_mlx.models import cpu_runner, ops

pytestmark = pytest.mark.usefixtures("pin_cpu")


def spy_on_streams(monkeypatch) -> list:
    """Record the stream each whole block and each shard's attention is built on:
    (what, stream, input shape, heads)."""
    from aim_mlx.models.aim import Block

    seen = []
    for name in ("__call__", "attention"):
        original = getattr(Block, name)

        def spy(self, x, _original=original, _name=name):
            stream = str(mx.default_stream(mx.cpu))
            seen.append((_name, stream, x.shape, self.attn.num_heads))
            return _original(self, x)

        monkeypatch.setattr(Block, name, spy)
    return seen


@pytest.mark.parametrize("batch", [2, 9])
def test_batch_split_over_cpu_streams(monkeypatch, batch):
    model = build_reference_model("last")
    x = mx.random.normal((batch, 3, 224, 224), key=mx.random.key(7))
    monkeypatch.setenv("AIM_MLX_CPU_STREAMS", "1")
    whole = to_np(model(x))
    one_by_one = np.concatenate([to_np(model(x[i : i + 1])) for i in range(batch)])
    monkeypatch.setenv("AIM_MLX_CPU_STREAMS", "2")
    seen = spy_on_streams(monkeypatch)
    split = to_np(model(x))
    # Every block ran whole on two streams, on the batch's two shares (uneven for 9: 4 + 5).
    calls = [s for s in seen if s[0] == "__call__"]
    assert len(calls) == 2 * 8 and len({s[1] for s in calls}) == 2
    assert sorted({s[2][0] for s in calls}) == sorted({batch // 2, batch - batch // 2})
    assert split.shape == (batch, 1000)
    # Only float32 rounding differs (matmuls of other shapes): far below the 1e-4 parity bound.
    assert rel_err(split, whole) <= 1e-5 and rel_err(split, one_by_one) <= 1e-5


@pytest.mark.parametrize("streams", [2, 3])
def test_block_shards_for_one_image(monkeypatch, streams):
    """One image: each stream computes its shard of every block (its heads, its share of the
    features), and the features and logits are the same, through `model(x)` or
    `extract_features`; 3 streams share 4 heads and 64 features unevenly."""
    model = build_reference_model("best")
    x = mx.array(np.load(REF / "input_252x196.npy"))  # 18 x 14 patches: 252 tokens
    ref = np.load(REF / "logits_best_252x196.npy")
    monkeypatch.setenv("AIM_MLX_CPU_STREAMS", "1")
    whole = model.extract_features(x, max_block_id=-1)
    monkeypatch.setenv("AIM_MLX_CPU_STREAMS", str(streams))
    seen = spy_on_streams(monkeypatch)
    split = model.extract_features(x, max_block_id=-1)
    assert {s[0] for s in seen} == {"attention"}  # shards' steps, never a whole block
    assert len(seen) == streams * 8 and {s[2] for s in seen} == {(1, 252, 64)}
    assert len({s[1] for s in seen}) == streams
    heads = [s[3] for s in seen[:streams]]
    assert sum(heads) == 4 and max(heads) - min(heads) <= 1
    seen.clear()
    logits = to_np(model(x))
    assert {s[0] for s in seen} == {"attention"} and len(seen) == streams * 7
    assert len(split) == len(whole) == 8
    for a, b in zip(split, whole, strict=True):
        assert a.shape == b.shape and rel_err(to_np(a), to_np(b)) <= 1e-5
    assert rel_err(logits, ref) <= 1e-4


def test_uneven_small_batch_is_sharded(monkeypatch):
    """Three images on two streams: shards of every block (not 2 + 1 images, which would leave
    a stream idle for a third of the time)."""
    model = build_reference_model("last")
    x = mx.random.normal((3, 3, 224, 224), key=mx.random.key(9))
    monkeypatch.setenv("AIM_MLX_CPU_STREAMS", "1")
    whole = to_np(model(x))
    monkeypatch.setenv("AIM_MLX_CPU_STREAMS", "2")
    seen = spy_on_streams(monkeypatch)
    split = to_np(model(x))
    assert {s[0] for s in seen} == {"attention"} and {s[2][0] for s in seen} == {3}
    assert rel_err(split, whole) <= 1e-5


@pytest.mark.parametrize("quantize", [False, True], ids=["float16", "4-bit"])
@pytest.mark.parametrize("batch", [1, 2])
def test_narrow_weights_widened_once_per_block(monkeypatch, quantize, batch):
    """Half-precision or quantized weights: widened once per block, for both streams (batch
    split) or a share on each stream (shards), and the split forward equals the one-stream
    forward."""
    import mlx.nn as nn

    from aim_mlx.models.layers import Linear

    model = build_reference_model("best")
    model.trunk.set_dtype(mx.float16)  # the head stays float32: nothing of it is widened
    if quantize:
        nn.quantize(
            model,
            group_size=32,
            bits=4,
            class_predicate=lambda p, m: ".blocks." in p and isinstance(m, Linear),
        )
    x = mx.random.normal((batch, 3, 224, 224), key=mx.random.key(8))
    monkeypatch.setenv("AIM_MLX_CPU_STREAMS", "1")
    whole = to_np(model(x))
    widened = []  # the shapes of the widened weights

    def counted(widen):
        def widen_and_count(*args):
            out = widen(*args)
            widened.append(out.shape)
            return out

        return widen_and_count

    for name in ("widen", "dequantize_float32"):
        monkeypatch.setattr(ops, name, counted(getattr(ops, name)))
    monkeypatch.setenv("AIM_MLX_CPU_STREAMS", "2")
    split = to_np(model(x))
    layers = [(3 * 64, 64), (64, 64), (256, 64), (64, 256)]  # qkv, proj, fc1, fc2
    if batch == 2:  # whole layers, once each, in blocks 0..6
        assert widened == layers * 7
    else:  # each stream its shares: half of the rows of each layer (qkv's in three pieces)
        shares = [(32, 64)] * 3 + [(32, 64), (128, 64), (32, 256)]
        assert sorted(widened) == sorted(shares * 2 * 7)
    assert rel_err(split, whole) <= 1e-5


def test_rows_of_a_layer():
    """`rows` keeps exactly the chosen output features, in order, for dense and quantized
    layers, and `split` cuts them into equal parts; `share` cuts a range into consecutive parts
    that cover it."""
    from aim_mlx.models.layers import Linear, QuantizedLinear, share

    x = mx.random.normal((5, 64), key=mx.random.key(1))
    dense = Linear.of(mx.random.normal((12, 64), key=mx.random.key(2)))
    for layer in (dense, QuantizedLinear.from_linear(dense, group_size=32, bits=4)):
        whole = np.array(layer(x))
        picked = layer.rows((1, 4), (9, 11))
        assert rel_err(np.array(picked(x)), whole[:, [1, 2, 3, 9, 10]]) <= 1e-6
        # split: equal shares of the outputs (of a layer, or of the ranges a shard picked)
        for j, part in enumerate(layer.split(3)):
            assert rel_err(np.array(part(x)), whole[:, 4 * j : 4 * j + 4]) <= 1e-6
        assert [np.array(p(x)).shape for p in picked.split(2)] == [(5, 3), (5, 2)]
        with pytest.raises(ValueError, match="2 parts cannot be split 3 ways"):
            picked.split(3)
    assert [share(10, i, 3) for i in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert [share(4, i, 3) for i in range(3)] == [(0, 1), (1, 2), (2, 4)]


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


def test_a_blank_core_count_leaves_openblas_its_own(monkeypatch):
    """AIM_MLX_CPU_CORES=" " is unset, as everywhere: one stream keeps OpenBLAS's own count
    (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS), not every core."""
    from aim_mlx import blas

    calls = []
    monkeypatch.setattr(blas, "set_threads", lambda n=None: calls.append(n) or True)
    monkeypatch.setenv("AIM_MLX_CPU_CORES", " ")
    monkeypatch.setenv("AIM_MLX_CPU_STREAMS", "1")
    build_reference_model("best").extract_features(mx.zeros((1, 3, 224, 224)))
    assert calls == [None]


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


def test_a_buffer_cache_larger_than_mlx_takes_is_no_limit(monkeypatch, cache_limit):
    """A limit past MLX's size_t (16 EiB) is taken as the largest it holds, not a TypeError at
    the first forward pass."""
    monkeypatch.setenv(cpu_runner.CACHE_ENV, str(1 << 64))
    assert cache_limit() == 2**64 - 1


def test_default_cores_are_those_the_process_may_run_on(monkeypatch):
    """`taskset -c 0` on a machine of several cores: one core, so one stream (OpenBLAS counts
    the affinity too)."""
    monkeypatch.delenv(cpu_runner.CORES_ENV, raising=False)
    monkeypatch.delenv(cpu_runner.STREAMS_ENV, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert cpu_runner.cores() == 1 and cpu_runner.streams() == 1


def test_buffer_cache_shown_by_info(monkeypatch):
    from aim_mlx import bench

    monkeypatch.delenv(cpu_runner.CACHE_ENV, raising=False)
    shown = bench.environment()["cpu_buffer_cache"]
    assert shown == "at least 1024 MB, from the first forward pass"
    monkeypatch.setenv(cpu_runner.CACHE_ENV, "off")
    assert bench.environment()["cpu_buffer_cache"] == "MLX's own (AIM_MLX_CPU_CACHE_MB=off)"


def test_buffer_cache_setting_checked(monkeypatch, cache_limit):
    from aim_mlx.errors import SettingError

    monkeypatch.setenv(cpu_runner.CACHE_ENV, "1GB")
    with pytest.raises(SettingError, match="AIM_MLX_CPU_CACHE_MB='1GB': expected a whole number"):
        cache_limit()


def test_forward_from_other_threads(monkeypatch):
    """MLX's streams belong to the thread that made them: a model used in one thread works in
    another (a notebook's worker, a server), alone or two threads at once, with the same
    result, by image and by shard."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("AIM_MLX_CPU_STREAMS", "2")
    model = build_reference_model("best")
    x = mx.array(np.load(REF / "input.npy"))  # batch 2: by image; one image: by shard
    here = [to_np(model(x)), to_np(model(x[:1]))]
    found = []
    thread = threading.Thread(target=lambda: found.append(to_np(model(x[:1]))))
    thread.start()
    thread.join()
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda i: to_np(model(x[: i + 1])), [1, 0, 1, 0]))
    assert len(found) == 1 and np.array_equal(found[0], here[1])
    for i, out in zip([1, 0, 1, 0], both, strict=True):
        assert rel_err(out, here[1 - i]) <= 1e-6


THREADED_PROGRAM = """
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import aim_mlx
import mlx.core as mx
import numpy as np

mx.set_default_device(mx.cpu)
x = np.load(sys.argv[1])
models = [aim_mlx.load(folder) for folder in sys.argv[2:]]
for model in models:
    mx.eval(model.parameters())


def run(i):  # one image (by shard) or two (by image), each model in turn
    return np.array(models[i % len(models)](mx.array(x[: 1 + i % 2])))


with ThreadPoolExecutor(2) as pool:
    print("ran", len(list(pool.map(run, range(2 * len(models))))))
loading = threading.Thread(target=aim_mlx.load, args=[sys.argv[2]])  # draws random init
loading.start()
loading.join()
"""


def test_program_that_ran_the_model_in_threads_exits_cleanly(tmp_path):
    """Every compiled kernel of the CPU path (GELU, softmax's exp, float16 widening,
    dequantization) run from worker threads, a model loaded in one, then the program's end:
    MLX freed the threads' compile caches and random keys while the interpreter exited, and
    the process aborted ("terminate called without an active exception", exit 134) in about 3
    runs out of 4 here with module-level compiled functions, and in about 1 in 2 after a
    worker thread only loaded a model."""
    folders = [
        convert_fixture(tmp_path / "float16", dtype="float16"),
        convert_fixture(tmp_path / "q8", quantize=True, q_bits=8),
    ]
    script = tmp_path / "threaded.py"
    script.write_text(THREADED_PROGRAM)
    command = [sys.executable, str(script), str(REF / "input.npy"), *map(str, folders)]
    for _ in range(6):
        run = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert (run.returncode, run.stdout) == (0, "ran 4\n"), run.stderr[-2000:]
        assert "terminate" not in run.stderr
