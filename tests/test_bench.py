"""`aim-mlx bench` and `info`: the FLOP count, random models made layer by layer, result rows."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REF, convert_fixture, exited_cleanly, reference_args
from mlx.utils import tree_flatten

from aim_mlx import bench
from aim_mlx.cli import main
from aim_mlx.convert.converter import QUANTIZED_LAYER
from aim_mlx.errors import OptionError
from aim_mlx.models import AIM, ModelArgs, ops, preset_args


def test_flops_per_image_by_hand():
    # The fixture shape: D = 64, 16 x 16 = 256 patches of 14 x 14 x 3 = 588 values, MLP 256.
    args = reference_args("best")
    patch = 2 * 256 * 588 * 64  # 19,267,584
    qkv = 2 * 256 * 64 * 192  # 6,291,456
    proj = 2 * 256 * 64 * 64  # 2,097,152
    attn = 2 * 256 * 256 * 64 * 2  # q k^T and a v: 16,777,216
    mlp = 2 * 256 * 64 * 256 * 2  # fc1 and fc2: 16,777,216
    assert args.num_heads == 4
    # the head: its query through W_k and W_v on 4 pooled tokens (64 x 64 each), the scores and
    # weighted means of 4 heads over 256 tokens of 64, the classifier
    head = 2 * 64 * 64 * 2 + 2 * 256 * 64 * 4 * 2 + 2 * 64 * 1000  # 406,528
    assert patch + 7 * (qkv + proj + attn + mlp) + head == 313_275_392
    assert bench.flops_per_image(args, 7, 224, 224) == 313_275_392
    # Non-square input: 18 x 14 patches.
    n = 18 * 14
    block = 2 * n * 64 * 192 + 2 * n * 64 * 64 + 4 * n * n * 64 + 4 * n * 64 * 256
    head = 4 * 64 * 64 + 4 * n * 64 * 4 + 2 * 64 * 1000
    assert bench.flops_per_image(args, 2, 252, 196) == 2 * n * 588 * 64 + 2 * block + head


def test_flops_aim_600m():
    # 24 D^2 N + 4 N^2 D per block: about 358 GFLOP per image for aim-600M's trunk at 224 px.
    args = preset_args("aim-600M", head="last")
    total = bench.flops_per_image(args, 24, 224, 224)
    trunk = 24 * (24 * 1536**2 * 256 + 4 * 256**2 * 1536)
    assert trunk == 357_556_027_392
    assert 0 < total - trunk < 0.01 * trunk  # patch embedding and head add under 1%
    assert bench.blocks_run(args) == 24
    assert bench.blocks_run(preset_args("aim-600M")) == 20  # best layers 14..19


SMALL = ModelArgs(embed_dim=256, num_blocks=3, num_heads=2, probe_layers=(1, 2))


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_random_model_dtypes(dtype):
    model = bench.random_model(SMALL, dtype)
    params = dict(tree_flatten(model.parameters()))
    assert {v.dtype for v in params.values()} == {dtype}
    assert not model.training
    w = np.array(params["trunk.blocks.0.mlp.fc1.weight"].astype(mx.float32))
    assert 0.017 < w.std() < 0.023 and abs(w.mean()) < 1e-3  # random, at a ViT's init scale
    out = model(mx.random.normal((1, 3, 56, 56), key=mx.random.key(0)))
    assert out.shape == (1, 1000) and np.isfinite(np.array(out)).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_random_model_quantized_like_the_converter(bits):
    model = bench.random_model(SMALL, mx.float16, q_bits=bits)
    quantized = {p for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    linears = {
        p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))
    }
    assert quantized == {p for p in linears if QUANTIZED_LAYER.match(p)}
    assert len(quantized) == 4 * SMALL.num_blocks
    assert all(m.bits == bits for p, m in model.named_modules() if p in quantized)
    assert bench.model_dtype_and_bits(model) == ("float16", bits)
    fc1 = model.trunk.blocks[0].mlp.fc1
    w = mx.dequantize(fc1.weight, fc1.scales, fc1.biases, fc1.group_size, bits)
    w = np.array(w.astype(mx.float32))
    assert 0.017 < w.std() < 0.023 and abs(w.mean()) < 1e-3  # drawn at a ViT's init scale
    assert len(np.unique(w[0])) > 2**bits // 2  # packed bits drawn over their full range


def test_random_model_never_holds_float32_weights():
    """Made layer by layer: peak memory is the 4-bit model plus about one float32 layer (on a
    GPU a little more: a command buffer's temporaries live until it completes)."""
    args = ModelArgs(embed_dim=512, num_blocks=8, num_heads=4, probe_layers=(7,))
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    model = bench.random_model(args, mx.float16, q_bits=4)
    peak = mx.get_peak_memory() - base
    weights = bench.weight_bytes(model)
    float32 = AIM(args).num_parameters() * 4  # lazy: shapes only, nothing is computed
    fc1_float32 = 512 * 2048 * 4
    assert weights < float32 / 5
    assert weights + 3 * fc1_float32 < float32 / 3
    assert peak < weights + (5 if ops.on_gpu() else 3) * fc1_float32


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny"
    convert_fixture(out)
    return out


def test_cli_bench_json_on_a_converted_folder(converted):
    res = CliRunner().invoke(
        main, ["bench", "--model", str(converted), "--batch-size", "1,2", "--iters", "2", "--json"]
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert [r["batch_size"] for r in rows] == [1, 2]
    for r in rows:
        assert (r["model"], r["dtype"], r["quantization"], r["blocks"]) == (
            "tiny",
            "float32",
            None,
            7,
        )
        assert r["images_per_s"] > 0 and 0 < r["latency_ms_p50"] <= r["latency_ms_p90"]
        assert r["peak_memory_gb"] >= r["weight_gb"] > 0
        assert r["gflops_per_image"] == pytest.approx(0.313275392)
        assert r["gflops_per_s"] == pytest.approx(r["gflops_per_image"] * r["images_per_s"])
        assert r["iters"] == 2 and r["blas"] and r["mlx_version"] == mx.__version__


def test_cli_bench_table_and_compile(converted):
    res = CliRunner().invoke(
        main, ["bench", "--model", str(converted), "--compile", "--iters", "1"]
    )
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[1].startswith("BLAS: ")
    header = lines[3].split()
    assert header[:3] == ["model", "blocks", "batch"] and "img/s" in header
    row = lines[5].split()
    assert row[:5] == ["tiny", "7", "1", "float32", "-"] and row[5] == "True"
    assert res.stderr == f"running {converted} batch 1 ...\n"  # its own dtype: in the row


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "aim-9B"], "not a preset"),
        (["--batch-size", "0"], "positive integers"),
        (["--batch-size", "1,x"], "expected integers"),
        (["--dtype", "float64"], "float32, float16 and/or bfloat16"),
        (["--q-bits", "3"], "'3' is not one of"),
    ],
)
def test_cli_bench_bad_input(args, message):
    res = CliRunner().invoke(main, ["bench", *args])
    assert message in exited_cleanly(res, 2).output  # a usage error


@pytest.mark.parametrize(
    "options, message",
    [
        ({"iters": 0}, "iters must be a whole number of 1 or more, got 0"),  # ZeroDivisionError
        ({"batch_size": 0}, "batch_size must be a whole number of 1 or more"),  # 0 img/s
        ({"warmup": -1}, "warmup must be a whole number of 0 or more"),  # one iteration less
        ({"model": "aim-600M", "dtype": "fp16"}, "dtype must be one of float32"),  # KeyError
        ({"model": "aim-600M", "head": "bset"}, "head must be best, last or None"),  # last's
        ({"model": "aim-600M", "q_bits": 3}, r"q_bits \(--q-bits\) must be 4 or 8, got 3"),  # 3 ran
        ({"model": "aim-600M", "q_bits": 4, "q_group_size": 48}, r"q_group_size \(--q-group-s"),
        ({"model": "aim-600M", "q_group_size": 32}, "q_group_size=32 applies with q_bits only"),
        ({"model": "aim-600M", "dtype": mx.int8}, "dtype must be one of.*got 'mlx.core.int8'"),
    ],
)
def test_python_bench_checks_its_config(converted, options, message):
    config = bench.BenchConfig(**{"model": str(converted), **options})
    with pytest.raises(ValueError, match=message):
        bench.run(config)


def test_batch_floor_by_hand():
    # The fixture: 16 x 16 = 256 tokens, fc1's output 256 wide (4 x 64).
    args = reference_args("best")
    one = 3 * 224 * 224 * 4 + 256 * 256 * 4  # the float32 input, fc1's output in float32
    assert bench.batch_floor(args, 2, 224, mx.float32) == 2 * one == 1_728_512
    assert bench.batch_floor(args, 3, 112, mx.float16) == 3 * (3 * 112 * 112 * 4 + 64 * 256 * 2)


def test_a_batch_that_cannot_fit_is_refused_before_it_is_made(converted, monkeypatch):
    """A batch larger than memory crashed MLX's CPU allocator (SIGSEGV, no message): refused,
    for a size before its random model is made, for a folder before the input is."""
    from aim_mlx import memory

    monkeypatch.setattr(bench, "random_model", lambda *a, **k: pytest.fail("model made"))
    monkeypatch.setattr(memory, "device_memory", lambda: (4 * 2**30, "memory"))
    # aim-600M in float16: 1.28 GiB of weights (686,794,752 with the head), and 3.7 MB a 224 px
    # image (its float32 input, fc1's output of 256 x 6144 in float16)
    config = bench.BenchConfig("aim-600M", batch_size=1000, dtype="float16")
    with pytest.raises(memory.NotEnoughMemoryError) as e:
        bench.check(config)
    assert str(e.value).startswith(
        "a batch of 1000 images takes at least 4.8 GiB (the weights, the input and one "
        "layer's output), more than this machine's 4.0 GiB of memory; use a smaller batch_size "
        "(--batch-size)"
    )
    bench.check(bench.BenchConfig("aim-600M", batch_size=500, dtype="float16"))  # 3.0 GiB
    monkeypatch.setattr(memory, "device_memory", lambda: (2**30, "memory"))
    with pytest.raises(memory.NotEnoughMemoryError, match="a batch of 1300 images takes at le"):
        bench.run(bench.BenchConfig(str(converted), batch_size=1300))  # 1.05 GiB + the weights
    monkeypatch.setenv("AIM_MLX_MEMORY_CHECK", "off")
    bench.check(config)


@pytest.mark.parametrize(
    "preset, img_size",
    [(False, size) for size in (30, -14, 0, 14.0, True)]
    # not 0 for a size: without the check, aim-600M would be built and timed at 224 px
    + [(True, size) for size in (30, -14, 14.0, True)],
)
def test_python_bench_checks_img_size_as_classify_does(converted, img_size, preset):
    """As the CLI's --img-size and aim_mlx.classify / embed check it (was, for a folder: 0
    benchmarked 224 px, 14.0 a TypeError from mx.random.normal, -14 "[bits] Negative
    dimensions", 30 a ValueError from the forward pass; for a size, ValueErrors of ModelArgs)."""
    config = bench.BenchConfig("aim-600M" if preset else str(converted), img_size=img_size)
    with pytest.raises(
        OptionError, match=r"img_size \(--img-size\) must be a positive multiple of 14, got"
    ):
        bench.run(config)


def test_python_bench_model_must_be_a_loaded_model():
    """As aim_mlx.classify says it (was "'str' object has no attribute 'args'")."""
    with pytest.raises(TypeError, match=r"give a loaded model, model = aim_mlx.load"):
        bench.run(bench.BenchConfig("aim-600M"), model="aim-600M")


def test_python_bench_takes_an_mlx_dtype():
    config = bench.BenchConfig("aim-600M", dtype=mx.float16)
    bench.check(config)  # was "dtype must be one of ..., got mlx.core.float16"
    assert config.dtype == "float16"


@pytest.mark.parametrize("model", [None, 600, ""])  # "": was the working folder
def test_python_bench_model_must_be_a_name_or_a_path(model):
    with pytest.raises(OptionError, match=r"model must be a size \(aim-600M, .*\) or a folder"):
        bench.check(bench.BenchConfig(model))  # None was a TypeError from pathlib


def test_python_bench_takes_a_size_in_any_case(tmp_path, monkeypatch):
    config = bench.BenchConfig("aim-600m")  # was "not a preset (aim-600M, ...) nor a model folder"
    bench.check(config)
    assert config.model == "aim-600M"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "aim-1b").mkdir()  # a folder of that name stays a folder
    assert bench.BenchConfig("aim-1b").model == "aim-1b"


def test_a_size_beside_a_converted_folder_of_its_name_is_a_size(converted, tmp_path, monkeypatch):
    """`check` and `make_model` take "aim-600M" as the size (random weights): so does the row
    (was head "converted", from the folder in the working directory)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(converted, tmp_path / "aim-600M")
    config = bench.BenchConfig("aim-600M", iters=1, warmup=0)
    bench.check(config)  # was a KeyError: the folder's own dtype (None) taken for the size's
    assert config.dtype == "float32"
    row = bench.run(config, model=bench.random_model(reference_args("last"), mx.float32))
    assert (row["model"], row["head"]) == ("aim-600M", "best")


def test_cli_bench_converts_a_folder_of_checkpoints_as_asked(tmp_path, monkeypatch):
    """As classify and the others take one (was "no config.json; not a converted folder")."""
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    hub_style = tmp_path / "hf"
    shutil.copytree(REF / "hf_repo", hub_style)
    res = CliRunner().invoke(main, ["bench", "-m", str(hub_style), "--dtype", "float16", "-q",
                                    "--iters", "1", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    [row] = [json.loads(line) for line in res.stdout.splitlines()]
    assert (row["model"], row["head"], row["dtype"], row["quantization"]) == (
        "hf", "best", "float16", 8,
    )  # fmt: skip
    [entry] = (tmp_path / "cache" / "models").iterdir()
    assert entry.name.endswith("--best--float16--q8g64")


def test_cli_bench_folder_refuses_dtype(converted):
    res = CliRunner().invoke(main, ["bench", "--model", str(converted), "--dtype", "float16"])
    assert res.exit_code == 2 and "converted folder" in res.output


@pytest.mark.parametrize("config", ["{damaged", '{"dtype": "float64"}'])
def test_cli_bench_folder_with_a_bad_config_says_so_with_dtype_too(converted, tmp_path, config):
    """Its dtype unknown, --dtype is not refused as another one: loading says what is wrong."""
    folder = tmp_path / "tiny"
    shutil.copytree(converted, folder)
    (folder / "config.json").write_text(config)
    res = CliRunner().invoke(main, ["bench", "--model", str(folder), "--dtype", "float32"])
    assert res.exit_code == 1 and "converted folder" not in res.output
    assert f"{folder}/config.json: " in exited_cleanly(res, 1).output


@pytest.mark.parametrize("warmup", [1, 0])
def test_peak_memory_is_that_of_the_timed_passes(warmup):
    """peak_memory_gb: mx.get_peak_memory over the timed passes, weights included (the
    counterpart of torch.cuda.max_memory_allocated); a warmup pass's own peak is left out."""
    passes = []

    class Spiky(AIM):  # its first pass holds a 256 MiB temporary
        def __call__(self, x):
            if not passes:
                mx.eval(mx.zeros((64, 2**20)))
            passes.append(1)
            return super().__call__(x)

    with mx.stream(mx.cpu):
        model = Spiky(reference_args("best"))
        mx.eval(model.parameters())
        config = bench.BenchConfig("spiky", 1, "float32", warmup=warmup, iters=1)
        row = bench.run(config, model=model)
    spike = 2**28 / 2**30  # GiB
    weights = row["weight_gb"]
    assert weights > 0 and row["peak_memory_gb"] >= weights  # the weights are counted
    if warmup:
        assert row["peak_memory_gb"] < spike
    else:
        assert row["peak_memory_gb"] >= spike


def test_cli_info():
    res = CliRunner().invoke(main, ["info"])
    assert res.exit_code == 0
    info = dict(line.split(": ", 1) for line in res.output.splitlines())
    assert info["mlx_version"] == mx.__version__
    assert set(info) >= {"device", "chip", "blas", "aim_mlx_version"}


def test_python_bench_takes_numpy_integers(converted):
    """A sweep over np.arange gives numpy integers: batch_size=np.int64(2) was "batch_size must
    be a whole number of 1 or more, got np.int64(2)", q_bits=np.int64(8) "must be 4 or 8"."""
    config = bench.BenchConfig(
        str(converted), batch_size=np.int64(2), iters=np.int32(1), warmup=np.int64(0)
    )
    row = bench.run(config)
    assert json.loads(json.dumps(row))["batch_size"] == 2  # Python ints: the row is JSON
    quantized = bench.BenchConfig("aim-600M", q_bits=np.int64(8), q_group_size=np.int64(64))
    assert (quantized.q_bits, quantized.q_group_size) == (8, 64)
    assert type(quantized.q_bits) is int and type(quantized.q_group_size) is int
    bench.check(quantized)


def test_a_folder_under_home_is_taken_with_its_tilde(converted, tmp_path, monkeypatch):
    """`--model=~/folder` (no shell expands it there): the folder, as aim_mlx.load takes it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(converted, tmp_path / "mine")
    for model in ("~/mine", Path("~/mine")):
        config = bench.BenchConfig(model, iters=1, warmup=0)
        bench.check(config)  # was "not a preset ... nor a model folder"
        assert Path(config.model) == tmp_path / "mine" and config.dtype is None
    res = CliRunner().invoke(main, ["bench", "--model=~/mine", "--iters", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["model"] == "mine"
