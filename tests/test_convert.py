"""The converter: output layout, dtypes, quantization, sharding, and refusing bad input safely."""

import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REF, appears_before_publish, exited_cleanly, rel_err
from safetensors import safe_open
from torch_zip import save_torch_zip

import aim_mlx
from aim_mlx.cli import main
from aim_mlx.convert import ConversionError, convert, open_checkpoint
from aim_mlx.convert import converter as converter_module
from aim_mlx.errors import OutputError

# Conversion, and float32 parity at CPU bounds: on the CPU whatever MLX's default device is.
pytestmark = pytest.mark.usefixtures("pin_cpu")

BACKBONE, HEAD_BEST, HEAD_LAST = (
    REF / "backbone.pth",
    REF / "head_best_layers.pth",
    REF / "head_last_layers.pth",
)
X = mx.array(np.load(REF / "input.npy"))
REF_BEST = np.load(REF / "logits_best.npy")


def run(out, **kw):
    kw = {
        "backbone": BACKBONE,
        "head": HEAD_BEST,
        "num_heads": 4,
        "probe_layers": "1,2,3,4,5,6",
        "progress": False,
        **kw,
    }
    return convert(out, **kw)


# The fixture's architecture as the weights' metadata records it (JSON text of each field).
ARCHITECTURE = {
    "embed_dim": "64",
    "num_blocks": "8",
    "num_heads": "4",
    "probe_layers": "[1, 2, 3, 4, 5, 6]",
    "patch_size": "14",
    "img_size": "224",
    "num_classes": "1000",
    "mlp_ratio": "4",
    "norm_eps": "1e-06",
}


def test_output_folder_layout(tmp_path):
    out = run(tmp_path / "m", dtype="bfloat16")
    assert sorted(p.name for p in out.iterdir()) == [
        "SHA256SUMS",
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["format_version"] == aim_mlx.convert.FORMAT_VERSION
    assert (config["embed_dim"], config["num_blocks"], config["num_heads"]) == (64, 8, 4)
    assert config["probe_layers"] == [1, 2, 3, 4, 5, 6]
    assert config["dtype"] == "bfloat16" and config["quantization"] is None
    assert [s["file"] for s in config["sources"]] == ["backbone.pth", "head_best_layers.pth"]
    assert config["sources"][0]["sha256"] == hashlib.sha256(BACKBONE.read_bytes()).hexdigest()
    # The safetensors library reads it; names are the official ones minus the dropped counter.
    official = set(open_checkpoint(BACKBONE).keys()) | set(open_checkpoint(HEAD_BEST).keys())
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        assert f.metadata() == {"format": "mlx", **ARCHITECTURE}
        assert set(f.keys()) == official - {"head.bn.num_batches_tracked"}
    weights = mx.load(str(out / "model.safetensors"))
    assert all(w.dtype == mx.bfloat16 for w in weights.values())
    assert weights["preprocessor.patchifier.proj.weight"].shape == (64, 14, 14, 3)
    src = np.array(open_checkpoint(BACKBONE).load("preprocessor.patchifier.proj.weight"))
    f32 = mx.load(str(run(tmp_path / "f32") / "model.safetensors"))
    np.testing.assert_array_equal(
        np.array(f32["preprocessor.patchifier.proj.weight"]), src.transpose(0, 2, 3, 1)
    )


def test_sharded_output_loads_identically(tmp_path, monkeypatch):
    monkeypatch.setattr(converter_module, "SHARD_BYTES", 300_000)
    out = run(tmp_path / "sharded")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        assert (out / shard).stat().st_size <= 300_000 + 64_000 + 10_000  # one tensor may spill
        with safe_open(out / shard, framework="numpy") as f:
            assert f.metadata() == {"format": "mlx", **ARCHITECTURE}
    logits = np.array(aim_mlx.load(out)(X))
    assert rel_err(logits, REF_BEST) < 1e-4


def test_hub_folder_with_safetensors(tmp_path):
    """A hub-style folder may hold model.safetensors (official names and layout) instead of .bin."""
    from safetensors.numpy import save_file

    hub = REF / "hf_repo"
    ckpt = open_checkpoint(hub / "pytorch_model.bin")
    folder = tmp_path / "hub"
    folder.mkdir()
    save_file({k: np.array(ckpt.load(k)) for k in ckpt.keys()}, folder / "model.safetensors")
    (folder / "config.json").write_text((hub / "config.json").read_text())
    model = aim_mlx.load(convert(tmp_path / "m", hf_path=folder, progress=False))
    assert rel_err(np.array(model(X)), REF_BEST) < 1e-4


@pytest.mark.parametrize("field", ["num_heads", "img_size"])
def test_a_zero_in_the_hub_config_or_the_options_is_refused_by_name(tmp_path, field):
    """0 heads or a 0 px image size, in a hub folder's config.json or as a Python argument, is
    an error naming it, not silently the preset's value."""
    folder = tmp_path / "hub"
    shutil.copytree(REF / "hf_repo", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, field: 0}))
    with pytest.raises(ConversionError, match=f"{field} must be a positive int.*config.json"):
        convert(tmp_path / "a", hf_path=folder, progress=False)
    with pytest.raises(ConversionError, match=f"{field} must be a positive int"):
        run(tmp_path / "b", **{field: 0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]  # no output made


def test_dtype_as_mlx_dtype(tmp_path):
    """As aim_mlx.load takes it: mx.float16 was "unknown dtype mlx.core.float16"."""
    out = run(tmp_path / "m", dtype=mx.float16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    with pytest.raises(ConversionError, match="unknown dtype 'mlx.core.int8'; choose one of"):
        run(tmp_path / "i8", dtype=mx.int8)


@pytest.mark.parametrize("options", [{"q_bits": 4}, {"q_group_size": 32}])
def test_quantization_options_without_quantize_are_refused(tmp_path, options):
    """As `--q-bits` without `-q` is a usage error: q_bits=4 alone converted unquantized."""
    with pytest.raises(ConversionError, match="apply with quantize=True only"):
        run(tmp_path / "m", **options)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options", [{"q_bits": 8.0}, {"q_group_size": 64.0}])
def test_quantization_options_are_whole_numbers(tmp_path, options):
    """8.0 passed `in (4, 8)`, then failed inside MLX's quantize: a TypeError traceback."""
    with pytest.raises(ConversionError, match=r"must be .*, got (8|64)\.0$"):
        run(tmp_path / "m", quantize=True, **options)
    assert list(tmp_path.iterdir()) == []


def test_quantization_options_take_numpy_integers(tmp_path, monkeypatch):
    """np.int64(8) from a sweep over np.arange was refused ("must be 4 or 8, got np.int64(8)");
    the folder's config.json holds plain integers, and aim_mlx.load takes them too."""
    out = run(tmp_path / "m", quantize=True, q_bits=np.int64(8), q_group_size=np.int32(32))
    config = json.loads((out / "config.json").read_text())
    assert (config["quantization"]["bits"], config["quantization"]["group_size"]) == (8, 32)
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))  # converted on load, there
    model = aim_mlx.load(REF / "hf_repo", quantize_bits=np.int64(8), q_group_size=np.int64(32))
    fc1 = model.trunk.blocks[0].mlp.fc1
    assert (fc1.bits, fc1.group_size) == (8, 32)
    np.testing.assert_array_equal(np.array(model(X)), np.array(aim_mlx.load(out)(X)))


def test_quantized_8bit_close_and_4bit_runs(tmp_path):
    q8 = aim_mlx.load(run(tmp_path / "q8", quantize=True, q_bits=8))
    # Trunk quantized, head in full precision.
    assert isinstance(q8.trunk.blocks[0].mlp.fc1, nn.QuantizedLinear)
    assert not isinstance(q8.head.k, nn.QuantizedLinear)
    config = json.loads((tmp_path / "q8" / "config.json").read_text())
    assert config["quantization"]["bits"] == 8 and len(config["quantization"]["layers"]) == 32
    out8 = np.array(q8(X))
    assert rel_err(out8, REF_BEST) < 0.05  # measured 0.032 x std on the fixture
    np.testing.assert_array_equal(out8.argmax(1), REF_BEST.argmax(1))
    # Native quantized matmul (the Metal path) agrees with the dequantize-then-matmul CPU path.
    q8.compute_dtype = mx.float32
    from aim_mlx.models import ops

    native = ops.widen_low_precision
    try:
        ops.widen_low_precision = lambda: False
        np.testing.assert_allclose(np.array(q8(X)), out8, rtol=1e-4, atol=1e-4)
    finally:
        ops.widen_low_precision = native
    q4 = aim_mlx.load(run(tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32))
    out4 = np.array(q4(X))
    assert out4.shape == (2, 1000) and np.isfinite(out4).all()
    assert rel_err(out4, REF_BEST) < 1.0  # measured 0.49 x std: tiny rows quantize coarsely


def test_quantizing_the_head_measurably_hurts(tmp_path, monkeypatch):
    """Why the head stays in full precision: its 3 layers cost more than their share."""
    trunk_only = rel_err(np.array(aim_mlx.load(run(tmp_path / "a", quantize=True))(X)), REF_BEST)
    pattern = converter_module.QUANTIZED_LAYER.pattern.removesuffix("$") + r"|head\.(k|v|linear)$"
    monkeypatch.setattr(converter_module, "QUANTIZED_LAYER", re.compile(pattern))
    with_head = rel_err(np.array(aim_mlx.load(run(tmp_path / "b", quantize=True))(X)), REF_BEST)
    assert with_head > 1.2 * trunk_only  # measured 0.042 vs 0.032 x std


def test_existing_output_needs_force(tmp_path):
    out = run(tmp_path / "m")
    marker = out / "config.json"
    before = marker.read_text()
    with pytest.raises(ConversionError, match="already exists.*--force"):
        run(out, dtype="float16")
    assert marker.read_text() == before
    run(out, dtype="float16", force=True)
    assert json.loads(marker.read_text())["dtype"] == "float16"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left


def _broken_head(tmp_path, drop=None, add=None, reshape=None):
    ckpt = open_checkpoint(HEAD_BEST)
    tensors = {k: np.array(ckpt.load(k)) for k in ckpt.keys() if k != drop}
    if add:
        tensors[add] = np.zeros(3, np.float32)
    if reshape:
        tensors[reshape] = tensors[reshape][:, :32]
    return save_torch_zip(tmp_path / "head.pth", tensors)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"drop": "head.k.weight"}, r"missing key 'head.k.weight' \(shape \(64, 64\).*head file"),
        ({"add": "head.extra.bias"}, r"unexpected key 'head.extra.bias' in .*head.pth"),
        (
            {"reshape": "head.v.weight"},
            r"shape mismatch for 'head.v.weight': .*head.pth has \(64, 32\), "
            r"the model expects \(64, 64\)",
        ),
    ],
)
def test_key_and_shape_errors(tmp_path, change, message):
    head = _broken_head(tmp_path, **change)
    with pytest.raises(ConversionError, match=message):
        run(tmp_path / "out", head=head)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_claiming_millions_of_blocks_fails_before_building_them(tmp_path, monkeypatch):
    """One key `trunk.blocks.9999999.*` makes 10 million blocks: none is built (each takes
    memory), the first missing key is named at once."""
    ckpt = open_checkpoint(BACKBONE)
    tensors = {k: np.array(ckpt.load(k)) for k in ckpt.keys()}
    tensors["trunk.blocks.9999999.norm_1.weight"] = np.zeros(64, np.float32)
    backbone = save_torch_zip(tmp_path / "backbone.pth", tensors)
    real_aim = converter_module.AIM

    def small_aim(args):
        assert args.num_blocks <= 8, f"built a model of {args.num_blocks} blocks"
        return real_aim(args)

    monkeypatch.setattr(converter_module, "AIM", small_aim)
    with pytest.raises(ConversionError) as e:
        run(tmp_path / "out", backbone=backbone)
    assert str(e.value) == (
        "missing key 'trunk.blocks.8.norm_1.weight' (shape (64,), 79999935 missing in all): "
        "is the backbone file the right one?"
    )
    assert not (tmp_path / "out").exists()


def test_layers_wider_than_mlx_supports_are_refused(tmp_path):
    """A head claiming 2**31 classes (its storage need not exist: shapes are checked first)."""
    ckpt = open_checkpoint(HEAD_BEST)
    tensors = {k: np.array(ckpt.load(k)) for k in ckpt.keys()}
    tensors["head.linear.weight"] = ((2**31, 64), np.float32, lambda: np.zeros(0, np.float32))
    with pytest.raises(ConversionError, match=r"num_classes 2147483648 or patch_size 14 make"):
        run(tmp_path / "out", head=save_torch_zip(tmp_path / "head.pth", tensors))


@pytest.mark.parametrize(
    "key, shape, layout",
    [
        ("preprocessor.patchifier.proj.weight", (), "(D, 3, P, P)"),
        ("preprocessor.patchifier.proj.weight", (64, 588), "(D, 3, P, P)"),
        ("preprocessor.patchifier.proj.weight", (0, 3, 14, 14), "(D, 3, P, P)"),
        ("trunk.blocks.0.mlp.fc1.weight", (), "(4D, D)"),
        ("head.linear.weight", (), "(N, D)"),
    ],
)
def test_tensors_the_architecture_is_read_from_have_their_rank(tmp_path, key, shape, layout):
    """The patch weight, the first fc1 and the classifier give the model's sizes: a damaged
    shape there was a traceback (unpacking, indexing, a division by zero), not an error."""
    source = BACKBONE if key.startswith(("preprocessor", "trunk")) else HEAD_BEST
    ckpt = open_checkpoint(source)
    tensors = {k: np.array(ckpt.load(k)) for k in ckpt.keys()}
    tensors[key] = np.zeros(shape, np.float32)
    bad = save_torch_zip(tmp_path / source.name, tensors)
    files = {"backbone": bad} if source == BACKBONE else {"head": bad}
    with pytest.raises(ConversionError) as e:
        run(tmp_path / "out", **files)
    assert str(e.value) == (
        f"{key!r} in {bad} has shape {shape}, not {layout}: is this an AIM v1 checkpoint?"
    )
    assert not (tmp_path / "out").exists()


def test_unresolvable_shapes_name_the_option(tmp_path):
    with pytest.raises(ConversionError, match=r"pass num_heads \(--num-heads\)"):
        run(tmp_path / "o", num_heads=None)
    with pytest.raises(ConversionError, match="--probe-layers") as given:
        run(tmp_path / "o", probe_layers="best")  # not an official size
    with pytest.raises(ConversionError) as named:  # "best" from the head file's name
        run(tmp_path / "o", probe_layers=None)
    assert str(given.value).startswith("probe_layers 'best' (--probe-layers best) reads blocks")
    assert str(named.value) == (
        "the head head_best_layers.pth (best layers, by its name) reads blocks known for the "
        "official sizes only; pass probe_layers (--probe-layers) block indices like 1,2,3,4,5,6"
    )
    renamed = tmp_path / "my_head.pth"
    renamed.write_bytes(HEAD_BEST.read_bytes())
    with pytest.raises(ConversionError, match="--probe-layers"):
        run(tmp_path / "o", head=renamed, probe_layers=None)
    # The official file names say which head it is.
    out = run(tmp_path / "last", head=HEAD_LAST, probe_layers=None)
    assert json.loads((out / "config.json").read_text())["probe_layers"] == [2, 3, 4, 5, 6, 7]


def test_probe_layers_from_python_are_integers(tmp_path):
    """A list from Python: block indices as given (range, numpy ints), never rounded: 2.5 was
    converted as block 2, a model whose head reads other blocks than it was trained on."""
    out = run(tmp_path / "range", probe_layers=range(1, 7))
    assert json.loads((out / "config.json").read_text())["probe_layers"] == [1, 2, 3, 4, 5, 6]
    for wrong, message in [([1.0, 2.5], "must be block indices"), ([True], "block indices"),
                           ([1, 1], "more than once"), (3, "must be a list")]:  # fmt: skip
        with pytest.raises(
            ConversionError, match=rf"probe_layers \(--probe-layers\): probe layers.*{message}"
        ):
            run(tmp_path / "o", probe_layers=wrong)
    assert not (tmp_path / "o").exists()


def test_backbone_and_head_sharing_a_key(tmp_path):
    with pytest.raises(ConversionError, match="'head.cls_token' is in both"):
        run(tmp_path / "o", backbone=HEAD_LAST)


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    produce, calls = converter_module._produce, []

    def interrupt_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return produce(*args)

    monkeypatch.setattr(converter_module, "_produce", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_cli_conversion_leaves_nothing(tmp_path, sig):
    """A real signal mid-conversion: the CLI exits 128 + the signal number (130 for Ctrl-C) and
    removes its temporary folder."""
    script = textwrap.dedent(f"""
        import os, sys
        from aim_mlx.convert import converter
        produce, calls = converter._produce, []
        def produce_then_signal(*args):
            calls.append(1)
            if len(calls) == 5:
                os.kill(os.getpid(), {int(sig)})
            return produce(*args)
        converter._produce = produce_then_signal
        from aim_mlx.cli import main
        sys.argv = ["aim-mlx", "convert", "--backbone", {str(BACKBONE)!r}, "--head",
                    {str(HEAD_LAST)!r}, "--num-heads", "4", "--out", {str(tmp_path / "out")!r}]
        main()
    """)
    # Started as from a terminal: a shell's background job inherits SIGINT ignored, and Python
    # then installs no Ctrl-C handler at all.
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        timeout=300,
    )
    assert proc.returncode == 128 + sig, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_signal_while_replacing_an_output_never_loses_it(tmp_path, sig):
    """--force moves the old folder aside, then renames the new one in: a signal between the
    two renames waits for the second (Ctrl-C, SIGTERM); after a SIGKILL there, the next run
    puts the old folder back. Never no model at all, never a hidden copy left over."""
    out = tmp_path / "out"
    run(out, dtype="float16")
    script = textwrap.dedent(f"""
        import os, pathlib, sys
        rename = pathlib.Path.rename
        def rename_then_signal(self, target):
            result = rename(self, target)
            if ".old-" in str(target):  # the old folder just moved aside
                os.kill(os.getpid(), {int(sig)})
            return result
        pathlib.Path.rename = rename_then_signal
        from aim_mlx.cli import main
        sys.argv = ["aim-mlx", "convert", "--backbone", {str(BACKBONE)!r}, "--head",
                    {str(HEAD_BEST)!r}, "--num-heads", "4", "--probe-layers", "1,2,3,4,5,6",
                    "--out", {str(out)!r}, "--force"]
        main()
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        timeout=300,
    )
    assert "Traceback" not in proc.stderr
    if sig == signal.SIGKILL:
        assert proc.returncode == -sig
        # the next run finds the old model back in place, as before the killed one
        again = CliRunner().invoke(
            main,
            [
                "convert",
                "--backbone",
                str(BACKBONE),
                "--head",
                str(HEAD_BEST),
                "--num-heads",
                "4",
                "--out",
                str(out),
            ],
        )
        assert again.exit_code == 1 and "already exists" in again.output
        expected = "float16"
    else:
        assert proc.returncode == 128 + sig, proc.stderr
        expected = "float32"  # the new model, whole: the signal came once it was in place
    assert json.loads((out / "config.json").read_text())["dtype"] == expected
    assert aim_mlx.load(out) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stale_partial_folder_of_a_dead_process_is_removed(tmp_path):
    stale = tmp_path / ".out.partial-999999999-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    run(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _dead_pid() -> int:
    """The PID of a process that has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


def _as_dead_process(path):
    """`path` (a temporary name of this process) renamed as if its process were gone."""
    return path.rename(path.with_name(re.sub(r"-\d+-", f"-{_dead_pid()}-", path.name, count=1)))


def _killed_while_deleting(path, **_):
    """shutil.rmtree stopped after one file (as by a SIGKILL)."""
    next(p for p in path.iterdir() if p.is_file()).unlink()
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["replacing", "clearing leftovers"])
def test_an_old_output_half_deleted_is_never_put_back(tmp_path, monkeypatch, where):
    """A process killed while deleting the old folder it replaced (once the new one is in
    place) leaves a leftover; if the user then removes the output, the next run must not put
    half of the old folder back as the output."""
    from aim_mlx import output

    out, other = tmp_path / "out", tmp_path / "new"
    if where == "clearing leftovers":  # the old folder a killed run moved aside, out in place
        other = tmp_path / f".out.old-{_dead_pid()}-deadbeef"
    for folder in (out, other):
        folder.mkdir()
        for name in ("config.json", "model.safetensors"):
            (folder / name).write_text(folder.name)
    with monkeypatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(output.shutil, "rmtree", _killed_while_deleting)
        if where == "replacing":
            output.move_into_place(other, out)
        else:
            output.remove_leftovers(out)
    (left,) = tmp_path.glob(".out.*")
    _as_dead_process(left)
    shutil.rmtree(out)  # the user's choice
    output.prepare_output(out, replaceable=lambda _: True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("theirs", ["an empty folder", "a model"])
def test_a_folder_made_during_the_conversion_is_kept(tmp_path, monkeypatch, theirs):
    """Without --force, a folder made by another process after the output was checked (here just
    before the conversion is renamed into place) is kept, empty or not: a clear error, and no
    temporary folder left."""
    out = tmp_path / "m"

    def make(folder):
        folder.mkdir()
        if theirs == "a model":
            (folder / "config.json").write_text("theirs")

    made = appears_before_publish(monkeypatch, out, make)
    with pytest.raises(ConversionError) as caught:
        run(out)
    assert made == [out]
    assert str(caught.value) == (
        f"{out} appeared while this command ran (another process?) and is kept; choose "
        "another output, or pass --force to replace it"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert [p.name for p in out.iterdir()] == (["config.json"] if theirs == "a model" else [])


@pytest.mark.parametrize("system", ["renameat2 / renamex_np", "hard links", "neither"])
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_rename_new_never_replaces(tmp_path, monkeypatch, system, kind):
    """output.rename_new on every path it takes: the system's no-replace rename, else a hard
    link (files), else a reservation made only where nothing is."""
    from aim_mlx import output

    if system != "renameat2 / renamex_np":
        monkeypatch.setattr(output, "_rename_noreplace", lambda src, dst: False)
    if system == "neither":

        def no_links(*args, **kwargs):
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))

        monkeypatch.setattr(os, "link", no_links)

    def make(path, content):
        if kind == "file":
            path.write_text(content)
        else:
            path.mkdir()
            (path / "a").write_text(content)

    def read(path):
        return path.read_text() if kind == "file" else (path / "a").read_text()

    new, taken, empty = tmp_path / "new", tmp_path / "taken", tmp_path / "empty"
    make(new, "new")
    make(taken, "theirs")
    empty.mkdir()
    for there in (taken, empty):
        with pytest.raises(OutputError, match=f"^{re.escape(str(there))} appeared while"):
            output.rename_new(new, there)
        assert read(new) == "new"
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")  # a name, even of a broken link
    with pytest.raises(OutputError, match="appeared while"):
        output.rename_new(new, tmp_path / "dangling")
    assert read(taken) == "theirs" and list(empty.iterdir()) == []
    output.rename_new(new, tmp_path / "out")
    assert read(tmp_path / "out") == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "empty", "out", "taken"]


def test_leftovers_are_judged_only_on_their_own_machine(tmp_path):
    """Temporary names carry their machine: on a disk several machines share, a run never
    clears (or restores) what a process of another machine is writing, whose PID means
    nothing here; this machine's dead processes' leftovers, tagged or older untagged, go."""
    from aim_mlx import output

    dead = _dead_pid()
    names = {
        "mine": f".out.partial-{dead}-deadbeef-{output.MACHINE}",
        "untagged": f".out.partial-{dead}-deadbeef",
        "other machine": f".out.partial-{dead}-deadbeef-{'0' * 6}",
        "other machine's old": f".out.old-{dead}-deadbeef-{'0' * 6}",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
    assert output.temp_path(tmp_path / "out").name.endswith(f"-{output.MACHINE}")
    output.prepare_output(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [names["other machine"], names["other machine's old"]]
    )


def test_a_link_named_like_an_old_output_is_not_put_back(tmp_path):
    from aim_mlx import output

    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / f".out.old-{_dead_pid()}-deadbeef").symlink_to(target)
    output.prepare_output(tmp_path / "out")
    assert not (tmp_path / "out").exists() and target.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]


def test_a_leftover_that_cannot_be_removed_does_not_stop_the_run(tmp_path, monkeypatch):
    """Another user's leftover in a shared folder (permission denied) is not this run's."""
    from aim_mlx import output

    stale = tmp_path / f".out.partial-{_dead_pid()}-deadbeef"
    stale.write_text("theirs")
    real = Path.unlink

    def denied(path, *args, **kwargs):
        if path == stale:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", denied)
    assert output.prepare_output(tmp_path / "out") == tmp_path / "out"
    assert stale.exists()


def test_cli_convert(tmp_path):
    runner = CliRunner()
    args = [
        "convert",
        "--backbone",
        str(BACKBONE),
        "--head",
        str(HEAD_LAST),
        "--num-heads",
        "4",
        "--out",
        str(tmp_path / "m"),
        "--dtype",
        "float16",
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "float16"
    again = runner.invoke(main, args)
    assert "already exists" in exited_cleanly(again, 1).output
    bad = runner.invoke(
        main,
        [
            "convert",
            "--backbone",
            str(REF / "input.npy"),
            "--head",
            str(HEAD_LAST),
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert bad.exit_code == 1 and "not a PyTorch checkpoint" in bad.output
    assert not (tmp_path / "x").exists()


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and aim_mlx.__version__ in result.output


def test_loader_errors(tmp_path):
    from aim_mlx.loader import ModelLoadError

    with pytest.raises(ModelLoadError, match="no config.json"):
        aim_mlx.load(tmp_path)
    out = run(tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "format_version": 0}))
    with pytest.raises(ModelLoadError, match="format version 0.*convert the checkpoints again"):
        aim_mlx.load(out)
    (out / "config.json").write_text(json.dumps({**config, "num_blocks": 9}))
    with pytest.raises(ModelLoadError, match="says num_blocks 9, but model.safetensors was conv"):
        aim_mlx.load(out)  # the weights' record of the architecture (else: blocks are missing)


def test_load_is_lazy(tmp_path):
    out = run(tmp_path / "m")
    before = mx.get_active_memory()
    model = aim_mlx.load(out)
    assert mx.get_active_memory() - before < 100_000  # the 2 MB of weights are not read yet
    mx.eval(model.parameters())
    assert mx.get_active_memory() - before > 1_500_000
    assert not model.training


def test_a_checked_source_is_not_hashed_again(tmp_path, monkeypatch):
    """The SHA-256 computed when a download is checked is reused for the folder's record."""
    from aim_mlx.convert import checkpoint

    monkeypatch.setattr(checkpoint, "_DIGESTS", {})
    digest = checkpoint.file_sha256(BACKBONE)  # as hub.verify does after a download
    assert digest == hashlib.sha256(BACKBONE.read_bytes()).hexdigest()
    hashed = []

    def counting_sha256(*data):
        hashed.append(data)
        return hashlib.sha256(*data)

    # the checkpoint module's hashes only: the writer hashes what it writes, with its own
    monkeypatch.setattr(checkpoint, "hashlib", SimpleNamespace(sha256=counting_sha256))
    out = run(tmp_path / "m")
    sources = json.loads((out / "config.json").read_text())["sources"]
    assert sources[0]["sha256"] == digest
    assert len(hashed) == 1  # the head only


def test_a_source_that_cannot_be_hashed_fails_the_conversion(tmp_path, monkeypatch, capfd):
    """The SHA-256 of the sources is computed on a second thread: a source removed or
    unreadable meanwhile is the conversion's one error, naming it; no output, no thread's
    traceback, no config.json with its sources left out."""

    def vanished(path, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(converter_module, "file_sha256", vanished)
    with pytest.raises(ConversionError) as e:
        run(tmp_path / "m")
    assert str(e.value) == f"{BACKBONE}: No such file or directory"
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []
    assert "Traceback" not in capfd.readouterr().err


def test_rename_new_elsewhere_than_linux_and_macos_takes_the_portable_way(tmp_path, monkeypatch):
    """Where there is neither renameat2 nor renamex_np (Windows: ctypes.CDLL(None) is a
    TypeError there), rename_new does not look for them: it links the file into place."""
    from aim_mlx import output

    monkeypatch.setattr(output.sys, "platform", "win32")
    monkeypatch.setattr(output.ctypes, "CDLL", lambda *a, **k: 1 / 0)  # never called
    output._noreplace_call.cache_clear()
    try:
        (tmp_path / "new").write_text("new")
        (tmp_path / "taken").write_text("theirs")
        with pytest.raises(OutputError, match="appeared while"):
            output.rename_new(tmp_path / "new", tmp_path / "taken")
        output.rename_new(tmp_path / "new", tmp_path / "out")
        assert (tmp_path / "out").read_text() == "new" and not (tmp_path / "new").exists()
    finally:
        output._noreplace_call.cache_clear()


def test_nan_or_inf_weights_are_refused_naming_the_tensor(tmp_path):
    ckpt = open_checkpoint(HEAD_BEST)
    tensors = {k: np.array(ckpt.load(k)) for k in ckpt.keys()}
    tensors["head.k.weight"][5, 7] = np.nan
    tensors["head.k.weight"][0, 0] = np.inf
    head = save_torch_zip(tmp_path / "head.pth", tensors)
    message = r"head.pth: tensor 'head.k.weight' holds 2 NaN or Inf value\(s\): the checkpoint"
    for dtype in ("float32", "float16", "bfloat16"):
        with pytest.raises(ConversionError, match=message):
            run(tmp_path / "out", head=head, dtype=dtype)
        assert sorted(os.listdir(tmp_path)) == ["head.pth"]


def test_weights_past_float16s_range_are_refused_in_float16_only(tmp_path):
    ckpt = open_checkpoint(HEAD_BEST)
    tensors = {k: np.array(ckpt.load(k)) for k in ckpt.keys()}
    tensors["head.linear.weight"][3, 4] = -1.0e5  # float16's largest: 65504
    head = save_torch_zip(tmp_path / "head.pth", tensors)
    with pytest.raises(ConversionError, match=r"'head.linear.weight' has values of size up to "
                       r"1e\+05, past float16's largest, 6.55e\+04; convert with dtype "
                       r"bfloat16 or float32 \(--dtype\)"):  # fmt: skip
        run(tmp_path / "f16", head=head, dtype="float16")
    result = CliRunner().invoke(main, ["convert", "--backbone", BACKBONE, "--head", head,
                                       "--num-heads", "4", "--probe-layers", "1,2,3,4,5,6",
                                       "--dtype", "float16", "-o", tmp_path / "cli"])  # fmt: skip
    assert "past float16's largest" in exited_cleanly(result, 1).output
    assert not (tmp_path / "cli").exists()
    for dtype in ("float32", "bfloat16"):
        folder = run(tmp_path / dtype, head=head, dtype=dtype)
        weights = aim_mlx.load(folder).head.linear.weight
        assert weights[3, 4].item() == (-1.0e5 if dtype == "float32" else -99840.0)  # rounded


def test_a_full_disk_says_so_not_to_convert_by_hand(tmp_path, monkeypatch):
    """A disk that fills midway: the message says to free space, leaves nothing behind, and
    a cache fill from a checkpoint folder no longer advises `aim-mlx convert --out DIR` (the
    advice for checkpoints it cannot convert alone), which would fill the same disk."""
    from aim_mlx import resolve
    from aim_mlx.convert import safetensors_writer

    def full(self, name, array):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_writer.SafetensorsWriter, "write", full)
    with pytest.raises(ConversionError) as e:
        convert(tmp_path / "m", hf_path=REF / "hf_repo", progress=False)
    assert str(e.value) == (
        f"{tmp_path / 'm'}: No space left on device: free some space and run the command again"
    )
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    hub = tmp_path / "hub"
    shutil.copytree(REF / "hf_repo", hub)
    with pytest.raises(ConversionError) as e:
        resolve.resolve(hub, dtype="float32", progress=False)
    assert str(e.value).endswith(
        "No space left on device: free some space and run the command again"
    )
    assert "aim-mlx convert" not in str(e.value)
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == []


def test_tensors_far_larger_than_their_files_are_refused(tmp_path, monkeypatch):
    """Compressed records of zeros (or views sharing one storage) let a file of a few MB stand
    for TBs of output: 1.4 MB wrote 904 MB before, unbounded but for the pickle's size. A
    deflated copy of real weights still converts."""
    import zipfile

    monkeypatch.setattr(converter_module, "SOURCE_SLACK", 0)  # 64 MiB in use
    real = REF / "hf_repo" / "pytorch_model.bin"
    for name, zeros in (("bomb", True), ("deflated", False)):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(REF / "hf_repo" / "config.json", folder)
        with (
            zipfile.ZipFile(real) as src,
            zipfile.ZipFile(folder / "pytorch_model.bin", "w", zipfile.ZIP_DEFLATED) as out,
        ):
            for info in src.infolist():
                data = src.read(info)
                if zeros and "/data/" in info.filename:
                    data = bytes(len(data))
                out.writestr(info.filename, data)
    convert(tmp_path / "ok", hf_path=tmp_path / "deflated", progress=False)
    bomb = tmp_path / "bomb" / "pytorch_model.bin"
    with pytest.raises(ConversionError) as e:
        convert(tmp_path / "out", hf_path=tmp_path / "bomb", progress=False)
    ckpt = open_checkpoint(real)
    claimed = sum(
        4 * math.prod(ckpt.shape(k)) for k in ckpt.keys() if k != "head.bn.num_batches_tracked"
    )
    assert str(e.value) == (
        f"the tensors in {bomb} take {claimed} bytes, more than twice the "
        f"files' {bomb.stat().st_size}: tensors sharing their bytes, or records that inflate far "
        "(a damaged file, or a zip bomb); download or copy the files again"
    )
    assert not (tmp_path / "out").exists()
