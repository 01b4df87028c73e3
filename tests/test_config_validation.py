"""Hand-edited or malformed configs (converted folders, hub-style folders, probe layers,
quantization options) are refused with one line naming the file and the field."""

import json
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REF, clean, convert_fixture, exited_cleanly
from conftest import run_cli as cli

import aim_mlx
from aim_mlx.cli import main
from aim_mlx.convert import ConversionError, convert
from aim_mlx.loader import ModelLoadError
from aim_mlx.models import ModelArgs

pytestmark = pytest.mark.usefixtures("pin_cpu", "private_cache")

ROCKET = REF / "images" / "rocket.jpg"
ARCH = dict(embed_dim=64, num_blocks=8, num_heads=4, probe_layers=[1, 2, 3])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_heads": 0}, "num_heads must be a positive integer, got 0"),
        ({"num_heads": 4.0}, "num_heads must be a positive integer, got 4.0"),
        ({"num_heads": True}, "num_heads must be a positive integer, got True"),
        ({"embed_dim": "64"}, "embed_dim must be a positive integer, got '64'"),
        ({"num_heads": 3}, "embed_dim 64 is not divisible by num_heads 3"),
        ({"img_size": 100}, "img_size 100 must be a multiple of patch_size 14"),
        ({"patch_size": 0}, "patch_size must be a positive integer, got 0"),
        ({"probe_layers": [1, 1, 2]}, "probe layers [1, 1, 2] name block 1 more than once"),
        ({"probe_layers": []}, "no probe layers given"),
        ({"probe_layers": 3}, "probe layers must be a list of block indices, got 3"),
        ({"probe_layers": [1, 2.5]}, "probe layers must be block indices (integers)"),
        ({"probe_layers": [1, 8]}, "probe layers [8] are outside blocks 0..7"),
        ({"norm_eps": "x"}, "norm_eps must be a number between 0 and 1"),
        ({"num_classes": 2**31}, "num_classes 2147483648 or patch_size 14 make a layer wider"),
        ({"mlp_ratio": 2**25}, "mlp_ratio 33554432, num_classes 1000"),
    ],
)
def test_model_args_name_the_bad_field(change, message):
    with pytest.raises(ValueError) as e:
        ModelArgs.from_dict({**ARCH, **change})
    assert message in str(e.value)


def test_model_args_require_the_architecture():
    with pytest.raises(ValueError, match="missing num_heads, probe_layers"):
        ModelArgs.from_dict({"embed_dim": 64, "num_blocks": 8})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_heads": 0}, "num_heads must be a positive integer, got 0"),
        ({"num_heads": 4.0}, "num_heads must be a positive integer, got 4.0"),
        ({"img_size": 100}, "img_size 100 must be a multiple of patch_size 14"),
        ({"img_size": 0}, "img_size must be a positive integer, got 0"),
        ({"embed_dim": "64"}, "embed_dim must be a positive integer, got '64'"),
        ({"num_blocks": None}, "missing num_blocks"),
        ({"dtype": "float64"}, "dtype must be one of float32, float16, bfloat16, got 'float64'"),
        ({"quantization": True}, "quantization must be null or an object, got True"),
        ({"quantization": {"bits": 8, "group_size": 64}}, "quantization layers must be a list"),
        (
            {"quantization": {"bits": 3, "group_size": 64, "layers": []}},
            "quantization bits must be 4 or 8",
        ),
        (
            {"quantization": {"bits": 4, "group_size": 48, "layers": []}},
            "quantization group_size must be one",
        ),
        ({"format_version": None}, "no format_version, this aim-mlx reads 1"),
        ({"format_version": 0}, "format version 0, this aim-mlx reads 1; convert the"),
        ({"format_version": 99}, "format version 99, written by a newer aim-mlx; this one"),
        ({"format_version": "1"}, "format version '1', this aim-mlx reads 1; convert the"),
        ({"format_version": True}, "format version True, this aim-mlx reads 1; convert the"),
        (  # 8.0 passed `in (4, 8)`, then MLX's quantize raised a TypeError: a traceback
            {"quantization": {"bits": 8.0, "group_size": 64, "layers": []}},
            "quantization bits must be 4 or 8, got 8.0",
        ),
        (
            {"quantization": {"bits": 8, "group_size": 64.0, "layers": []}},
            "quantization group_size must be one of 32, 64, 128, got 64.0",
        ),
        (
            {"num_classes": 10**12},
            "embed_dim 64, mlp_ratio 4, num_classes 1000000000000 or patch_size 14 make a layer "
            "wider than 2**31 - 1, the most MLX supports",
        ),
        ({"mlp_ratio": 10**8}, "embed_dim 64, mlp_ratio 100000000, num_classes 1000"),
    ],
)
def test_hand_edited_converted_config_is_one_line(model_dir, tmp_path, change, message):
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(config))
    err = clean(cli("classify", ROCKET, "-m", folder, "--no-progress"), 1)
    assert f"Error: {folder / 'config.json'}: {message}" in err
    with pytest.raises(ModelLoadError, match="config.json: "):
        aim_mlx.load(folder)


@pytest.mark.parametrize(
    "field, value",
    [("num_heads", 8), ("probe_layers", [2, 3, 4, 5, 6, 7]), ("img_size", 294), ("norm_eps", 1e-5)],
)
def test_an_edited_architecture_is_refused_naming_the_field(model_dir, tmp_path, field, value):
    """The weights cannot tell the head count (nor the probe layers, the image size, norm_eps):
    an edited one made a silently different model. The converter records them in the weights'
    metadata; the loader compares."""
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    was = config[field]
    (folder / "config.json").write_text(json.dumps({**config, field: value}))
    err = clean(cli("classify", ROCKET, "-m", folder, "--no-progress"), 1)
    assert err.endswith(
        f"Error: {folder}/config.json says {field} {json.dumps(value)}, but model.safetensors "
        f"was converted with {field} {json.dumps(was)}: config.json was edited or damaged; "
        "convert the model again\n"
    )
    with pytest.raises(ModelLoadError, match=f"says {field} "):
        aim_mlx.load(folder)


def test_an_edited_head_count_in_a_cache_entry_says_how_to_remove_it(model_dir):
    from aim_mlx import cache

    entry = cache.entry_dir("x--best--float32")
    shutil.copytree(model_dir, entry)
    config = json.loads((entry / "config.json").read_text())
    (entry / "config.json").write_text(json.dumps({**config, "num_heads": 2}))
    err = clean(cli("classify", ROCKET, "-m", entry, "--no-progress"), 1)
    assert (
        "config.json says num_heads 2, but model.safetensors was converted with num_heads 4" in err
    )
    assert err.endswith(
        "remove it with `aim-mlx cache rm x--best--float32` (converted again on next use)\n"
    )


def test_a_folder_converted_before_the_architecture_was_recorded_loads(model_dir, tmp_path):
    """Weights without the architecture in their metadata load as before, unchecked."""
    from safetensors import safe_open

    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    without_architecture(folder)
    with safe_open(folder / "model.safetensors", framework="numpy") as f:
        assert f.metadata() == {"format": "mlx"}
    x = mx.array(np.load(REF / "input.npy"))
    np.testing.assert_array_equal(
        np.array(aim_mlx.load(folder)(x)), np.array(aim_mlx.load(model_dir)(x))
    )


def without_architecture(folder) -> None:
    """`folder`'s weights as the aim-mlx before the architecture was recorded wrote them."""
    weights = mx.load(str(folder / "model.safetensors"))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})


@pytest.mark.parametrize("recorded", [True, False])
def test_a_config_claiming_millions_of_blocks_fails_before_building_them(
    model_dir, tmp_path, monkeypatch, recorded
):
    """Each block built takes memory (about 60 KB at this size): 10 million would exhaust it.
    The weights' record of the architecture says so; without one, the missing blocks do."""
    from aim_mlx import loader

    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    if not recorded:
        without_architecture(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_blocks": 10**7}))
    real_aim = loader.AIM

    def small_aim(args):
        assert args.num_blocks <= 8, f"built a model of {args.num_blocks} blocks"
        return real_aim(args)

    monkeypatch.setattr(loader, "AIM", small_aim)
    err = clean(cli("classify", ROCKET, "-m", folder, "--no-progress"), 1)
    assert err.strip() == (
        f"Error: {folder}/config.json says num_blocks 10000000, but model.safetensors was "
        "converted with num_blocks 8: config.json was edited or damaged; convert the model again"
        if recorded
        else f"Error: {folder}: weights lack 'trunk.blocks.8.*' (config.json says num_blocks "
        "10000000); convert the model again"
    )


def test_json_nested_too_deep_is_one_line_not_a_traceback(model_dir, tmp_path):
    """Python's JSON parser recurses: 200 KB of brackets raised RecursionError."""
    deep = "[" * 10**5 + "]" * 10**5
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    (folder / "config.json").write_text(deep)
    err = clean(cli("classify", ROCKET, "-m", folder, "--no-progress"), 1)
    assert err.startswith(f"Error: {folder / 'config.json'}: not valid JSON (maximum recursion")
    shutil.copy(model_dir / "config.json", folder / "config.json")
    (folder / "model.safetensors.index.json").write_text(deep)
    with pytest.raises(ModelLoadError, match="index.json: cannot read the shard list"):
        aim_mlx.load(folder)
    head = tmp_path / "head"
    head.mkdir()
    (head / "head.safetensors").write_bytes(b"")
    (head / "config.json").write_text(deep)
    err = clean(cli("classify", ROCKET, "-m", model_dir, "--head", head, "--no-progress"), 1)
    assert err.startswith(f"Error: {head / 'config.json'}: cannot read it (maximum recursion")
    registry = tmp_path / "models.json"
    for text in (deep, "\udcff"):  # nested too deep; not UTF-8
        registry.write_text(text, errors="surrogateescape")
        result = CliRunner().invoke(main, ["models"], env={"AIM_MLX_REGISTRY": str(registry)})
        assert result.stderr.startswith(f"Error: cannot read the registry file {registry}")
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    from aim_mlx import cache

    feature_set = cache.features_root() / "set"
    feature_set.mkdir(parents=True)
    (feature_set / "info.json").write_text(deep)
    assert [entry.info for entry in cache.list_feature_sets()] == [None]  # listed as unknown


def test_an_empty_config_is_not_called_missing(model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    (folder / "config.json").write_text("{}")
    err = clean(cli("classify", ROCKET, "-m", folder), 1)
    assert f"{folder / 'config.json'}: no format_version" in err
    assert "no config.json" not in err


def hub_folder(tmp_path, config) -> str:
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "pytorch_model.bin").symlink_to(REF / "hf_repo" / "pytorch_model.bin")
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "config.json").write_text(text)
    return folder


HUB_CONFIG = json.loads((REF / "hf_repo" / "config.json").read_text())


@pytest.mark.parametrize(
    "config, message",
    [
        ("{bad", "config.json: cannot read it as JSON"),
        ([1, 2], "config.json: expected a JSON object, got list"),
        ({**HUB_CONFIG, "probe_layers": 3}, "probe layers must be a list of block indices"),
        ({**HUB_CONFIG, "img_size": 100}, "img_size 100 must be a multiple of patch_size 14"),
        ({**HUB_CONFIG, "num_heads": "4"}, "num_heads must be a positive integer, got '4'"),
        ("[" * 10**5 + "]" * 10**5, "config.json: cannot read it as JSON (maximum recursion"),
    ],
)
def test_bad_hub_style_config_is_one_line(tmp_path, config, message):
    folder = hub_folder(tmp_path, config)
    err = clean(cli("convert", "--hf-path", folder, "-o", tmp_path / "o", "--no-progress"), 1)
    assert message in err and str(folder / "config.json") in err
    assert not (tmp_path / "o").exists()
    err = clean(cli("classify", ROCKET, "-m", folder, "--no-progress"), 1)
    assert message in err


def test_a_long_probe_layer_list_is_checked_in_one_pass(model_dir, tmp_path):
    """A config listing 300,000 probe layers: counting each one's repeats was quadratic (it
    ran for many minutes before saying anything)."""
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    layers = [*range(300_000), 7]
    (folder / "config.json").write_text(json.dumps({**config, "probe_layers": layers}))
    with pytest.raises(ModelLoadError, match=r"\[0, 1, .*, 11, \.\.\.\] name block 7 more") as e:
        aim_mlx.load(folder)
    assert len(str(e.value)) < 300  # a dozen layers, not 2 MB of them


def test_repeated_probe_layers_are_refused(tmp_path):
    args = ["convert", "--backbone", REF / "backbone.pth", "--head", REF / "head_best_layers.pth"]
    err = clean(
        cli(*args, "-o", tmp_path / "o", "--num-heads", "4", "--probe-layers", "1,1,2,3,4,5"), 1
    )
    assert "probe layers [1, 1, 2, 3, 4, 5] name block 1 more than once" in err
    err = clean(cli(*args, "-o", tmp_path / "o", "--probe-layers", ","), 2)
    assert "probe_layers (--probe-layers) must be best, last or block indices" in err
    assert not (tmp_path / "o").exists()


def test_group_sizes_mlx_cannot_use_are_refused(tmp_path):
    kw = dict(backbone=REF / "backbone.pth", head=REF / "head_best_layers.pth", num_heads=4)
    kw.update(probe_layers="1,2,3,4,5,6", quantize=True, q_bits=4, progress=False)
    for size in (0, 16, 48):
        with pytest.raises(
            ConversionError,
            match=rf"q_group_size \(--q-group-size\) must be one of 32, 64, 128, got {size}",
        ):
            convert(tmp_path / "o", q_group_size=size, **kw)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("backbone.pth", "head_best_layers.pth"):
        (folder / name).symlink_to(REF / name)
    from aim_mlx.errors import OptionError

    with pytest.raises(
        OptionError, match=r"q_group_size \(--q-group-size\) must be one of 32, 64, 128, got 48"
    ):
        aim_mlx.load(folder, quantize_bits=4, q_group_size=48, progress=False)


def test_layers_a_group_size_cannot_quantize_are_reported(tmp_path, capsys):
    """On the 64-wide model, group 128 fits only fc2's 256 inputs: 8 of 32 layers, said so."""
    kw = dict(backbone=REF / "backbone.pth", head=REF / "head_best_layers.pth", num_heads=4)
    out = convert(
        tmp_path / "o", probe_layers="1,2,3,4,5,6", quantize=True, q_bits=4, q_group_size=128, **kw
    )
    assert "quantized 8 of 32 trunk linear layers" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert len(config["quantization"]["layers"]) == 8
    assert all(layer.endswith("mlp.fc2") for layer in config["quantization"]["layers"])


# ---- The weights a converted folder holds ------------------------------------------------


def test_only_the_listed_shards_are_read(tmp_path, monkeypatch):
    from aim_mlx.convert import converter

    monkeypatch.setattr(converter, "SHARD_BYTES", 300_000)
    kw = dict(backbone=REF / "backbone.pth", head=REF / "head_best_layers.pth", num_heads=4)
    out = convert(tmp_path / "m", probe_layers="1,2,3,4,5,6", progress=False, **kw)
    shards = sorted(out.glob("model-*.safetensors"))
    # A leftover file that matches model*.safetensors is not merged in (it would be unexpected)
    mx.save_safetensors(str(out / "model_v2.safetensors"), {"stray": mx.zeros(1)})
    aim_mlx.load(out)
    shards[1].unlink()
    with pytest.raises(ModelLoadError, match=f"{shards[1]}: a weight shard listed in"):
        aim_mlx.load(out)


@pytest.mark.parametrize("where", ["relative", "absolute", "parent"])
def test_shards_outside_the_folder_are_refused(model_dir, tmp_path, where):
    """A hand-made or downloaded index cannot make the loader read another folder's files."""
    folder, other = tmp_path / "m", tmp_path / "other"
    shutil.copytree(model_dir, folder)
    other.mkdir()
    (folder / "model.safetensors").rename(other / "model.safetensors")  # loadable, elsewhere
    name = {
        "relative": "../other/model.safetensors",
        "absolute": str(other / "model.safetensors"),
        "parent": "..",
    }[where]
    keys = mx.load(str(other / "model.safetensors"))
    index = {"weight_map": dict.fromkeys(keys, name)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=f"shard '{re.escape(name)}' is not a file name in"):
        aim_mlx.load(folder)


@pytest.mark.parametrize("listing", [{}, [], {"weight_map": {"a": 1}}, {"weight_map": "x"}])
def test_a_shard_list_without_a_weight_map_is_one_line(model_dir, tmp_path, listing):
    """Was Python's own words: "('weight_map')", "unsupported operand type(s) for /"..."""
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(listing))
    err = clean(cli("classify", ROCKET, "-m", folder, "--no-progress"), 1)
    assert err == (
        f'Error: {folder / "model.safetensors.index.json"}: expected a "weight_map" object '
        "from tensor names to shard file names; convert the model again\n"
    )


def test_a_tensor_in_two_shards_is_refused(model_dir, tmp_path):
    """A tensor in two shards: the shard read last won, silently (here: zeros)."""
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    weights = mx.load(str(folder / "model.safetensors"))
    key = "trunk.blocks.0.mlp.fc1.weight"
    trunk = {k: v for k, v in weights.items() if k.startswith("trunk.")}
    rest = {k: v for k, v in weights.items() if k not in trunk}
    mx.save_safetensors(str(folder / "a.safetensors"), trunk)
    mx.save_safetensors(str(folder / "b.safetensors"), {**rest, key: mx.zeros_like(weights[key])})
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {k: "a.safetensors" if k in trunk else "b.safetensors" for k in weights}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=f"b.safetensors: '{key}' is in another shard too"):
        aim_mlx.load(folder)


def test_a_tensor_pointed_at_another_ones_bytes_is_refused(model_dir, tmp_path):
    """A header edited so that a tensor reads another one's bytes (MLX's reader allows it)
    loaded a silently different model."""
    import struct

    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    raw = (folder / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    one, two = "trunk.blocks.0.mlp.fc1.weight", "trunk.blocks.1.mlp.fc1.weight"
    header[two]["data_offsets"] = header[one]["data_offsets"]
    text = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    err = clean(cli("classify", ROCKET, "-m", folder, "--no-progress"), 1)
    assert f"Error: {folder / 'model.safetensors'}: damaged weights (" in err
    assert err.endswith("; convert the model again\n")


def test_weights_in_another_dtype_than_the_config_are_refused(model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    weights = mx.load(str(folder / "model.safetensors"))
    key = "trunk.blocks.0.mlp.fc1.weight"
    weights[key] = weights[key].astype(mx.int32)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    with pytest.raises(ModelLoadError, match=f"'{key}' is stored as mlx.core.int32, the config"):
        aim_mlx.load(folder)


def test_quantized_weights_pass_the_dtype_check(tmp_path):
    kw = dict(backbone=REF / "backbone.pth", head=REF / "head_best_layers.pth", num_heads=4)
    out = convert(
        tmp_path / "q",
        probe_layers="1,2,3,4,5,6",
        quantize=True,
        dtype="float16",
        progress=False,
        **kw,
    )
    assert aim_mlx.load(out).trunk.blocks[0].mlp.fc1.scales.dtype == mx.float16


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda q: q["layers"].append("trunk.post_trunk_norm"),
            "quantization lists 'trunk.post_trunk_norm', which is not a linear layer",
        ),
        (
            lambda q: q["layers"].append("preprocessor.patchifier.proj"),
            "quantization lists 'preprocessor.patchifier.proj', which is not a linear layer",
        ),
        (
            lambda q: q.update(group_size=128),
            r"quantization does not fit the layers \(\[quantize\] The last dimension",
        ),
    ],
)
def test_quantized_layers_that_cannot_be_are_one_line(tmp_path, change, message):
    """config.json's list of quantized layers naming a norm or the patch convolution, or a
    group size that does not divide their inputs: MLX's ValueError was a traceback."""
    kw = dict(backbone=REF / "backbone.pth", head=REF / "head_best_layers.pth", num_heads=4)
    out = convert(
        tmp_path / "q", probe_layers="1,2,3,4,5,6", quantize=True, q_group_size=32,
        progress=False, **kw,
    )  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    change(config["quantization"])
    (out / "config.json").write_text(json.dumps(config))
    err = clean(cli("classify", ROCKET, "-m", out), 1)
    assert re.fullmatch(f"Error: {out}/config.json: {message}.*; convert the model again\n", err)


# ---- The cache: damaged entries, removing, listing, where it is ---------------------------


def test_a_damaged_cache_entry_says_how_to_remove_it(model_dir):
    from aim_mlx import cache

    entry = cache.entry_dir("x--best--float32")
    shutil.copytree(model_dir, entry)
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    err = clean(cli("classify", ROCKET, "-m", entry, "--no-progress"), 1)
    assert f"{weights}: cannot read the weights" in err
    assert "remove it with `aim-mlx cache rm x--best--float32`" in err


def feature_set(key: str):
    from aim_mlx import cache

    folder = cache.features_root() / key
    folder.mkdir(parents=True)
    (folder / "a.npy").write_bytes(b"x" * 100)
    return folder


def test_cache_rm_checks_every_name_before_removing_any():
    folder = feature_set("set-1")
    err = clean(cli("cache", "rm", "set-1", "typo"), 1)
    assert "nothing cached under 'typo'" in err
    assert folder.exists()
    err = clean(cli("cache", "rm", "typo", "--all"), 1)  # a mistyped name is refused with --all too
    assert "nothing cached under 'typo'" in err
    assert folder.exists()
    result = cli("cache", "rm", "set-1")
    clean(result, 0)
    assert result.stdout == "removed features set-1 (0.0 MB)\n"
    assert not folder.exists()
    result = cli("cache", "rm", "--all")
    assert (
        result.stdout == "nothing to remove: the cache holds no converted models or feature sets\n"
    )


def test_cache_rm_of_an_entry_removes_that_entry_only():
    """An entry's key as `cache list` shows it (in any case) is that entry, not also the
    quantized ones whose keys it begins; a model name is every entry of the model."""
    from aim_mlx import cache

    keys = ["x--best--float32", "x--best--float32--q4g64", "x--last--float32"]
    for key in keys:
        cache.entry_dir(key).mkdir(parents=True)
    result = cli("cache", "rm", "X--BEST--FLOAT32")
    assert clean(result, 0) == "" and result.stdout == "removed x--best--float32 (0.0 MB)\n"
    assert [e.key for e in cache.list_entries()] == keys[1:]
    result = cli("cache", "rm", "x")
    assert result.stdout.splitlines() == [f"removed {key} (0.0 MB)" for key in keys[1:]]


def test_cache_rm_works_with_an_unreadable_registry(tmp_path, monkeypatch):
    """`cache list` compares registered models' entries with the registry; an unreadable
    AIM_MLX_REGISTRY leaves that out and never stops a removal."""
    from aim_mlx import cache

    cache.entry_dir("x--best--float32").mkdir(parents=True)
    monkeypatch.setenv("AIM_MLX_REGISTRY", str(tmp_path / "missing.json"))
    result = cli("cache", "rm", "--all")
    assert clean(result, 0) == "" and result.stdout == "removed x--best--float32 (0.0 MB)\n"


def test_json_listings_include_the_feature_sets():
    folder = feature_set("set-1")
    text = cli("cache").stdout
    listing = json.loads(cli("cache", "list", "--json").stdout)
    info = json.loads(cli("info", "--json").stdout)
    assert "set-1" in text
    expected = [dict(key="set-1", path=str(folder), images=1, size=100)]
    assert listing["features"] == expected and info["cache"]["features"] == expected
    assert info["cache"] == listing


def test_a_relative_cache_is_made_absolute(tmp_path, monkeypatch):
    from aim_mlx import cache

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AIM_MLX_CACHE", "relcache")
    assert cache.cache_root() == tmp_path / "relcache"
    assert json.loads(cli("cache", "list", "--json").stdout)["cache"] == str(tmp_path / "relcache")


def test_a_blank_cache_setting_is_unset(tmp_path, monkeypatch):
    from aim_mlx import cache

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(cache.sys, "platform", "linux")
    for blank in (" ", "\t"):
        monkeypatch.setenv("AIM_MLX_CACHE", blank)
        assert cache.cache_root() == tmp_path / "xdg" / "aim-mlx"


def test_a_cache_that_is_a_file_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "afile"))
    err = clean(cli("cache"), 1)
    assert f"Error: the model cache {tmp_path / 'afile'} is not a folder; set AIM_MLX_CACHE" in err


# ---- bench ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["-b", "1,,2"], "expected integers like 1,8,32, got '1,,2'"),
        (["--dtype", "float32,,float16"], "expected float32, float16 and/or bfloat16"),
        (["--head", "last"], "(--dtype, --quantize, --head) apply to sizes and checkpoint folders"),
        (["--dtype", "float16"], "(--dtype, --quantize, --head) apply to sizes and checkpoint"),
    ],
)
def test_bench_refuses_what_it_cannot_honour_before_running(model_dir, args, message):
    result = cli("bench", "-m", model_dir, *args)
    err = clean(result, 2)
    assert message in err and "running" not in result.output


def test_bench_of_a_trained_head_folder_says_what_it_is(model_dir, tmp_path):
    folder = tmp_path / "head"
    folder.mkdir()
    config = {"format": "aim-mlx-trained-head", "format_version": 1, "embed_dim": 64}
    (folder / "config.json").write_text(json.dumps(config))
    err = clean(cli("bench", "-m", folder), 1)
    assert f"{folder} is a trained head's folder, not a model: pass it as head (--head)" in err


def test_bench_of_a_converted_folder_takes_its_own_dtype_only(tmp_path):
    """A converted folder runs in the dtype it was converted to: that dtype given is fine,
    another one (float32, the default for sizes, included) is refused, not ignored."""
    from aim_mlx import bench

    folder = convert_fixture(tmp_path / "f16", dtype="float16")
    assert bench.BenchConfig(str(folder)).dtype is None  # the folder's own
    assert bench.BenchConfig("aim-600M").dtype == "float32"
    err = clean(cli("bench", "-m", folder, "--dtype", "float32"), 2)
    assert f"{folder}: a converted folder is benchmarked as it was converted (float16)" in err
    for given in ([], ["--dtype", "float16"]):
        result = cli("bench", "-m", folder, "--json", "--iters", "1", "--warmup", "0", *given)
        assert json.loads(exited_cleanly(result, 0).stdout)["dtype"] == "float16"


def test_an_interrupted_cache_rm_leaves_no_damaged_entry(model_dir, monkeypatch):
    """The entry leaves the cache before its files are deleted: Ctrl-C midway leaves a hidden
    leftover, not a half-deleted entry listed as an old format; once its process is gone,
    `cache rm --all` clears it."""
    import subprocess
    import sys

    from aim_mlx import cache

    entry = cache.entry_dir("x--best--float32")
    shutil.copytree(model_dir, entry)

    def interrupted(path, **_):
        next(p for p in path.iterdir() if p.is_file()).unlink()  # one file deleted, then Ctrl-C
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(cache.shutil, "rmtree", interrupted)
        assert cli("cache", "rm", "x--best--float32").exit_code == 130
    assert not entry.exists() and cache.list_entries() == []
    (left,) = entry.parent.iterdir()
    assert left.name.startswith(".x--best--float32.partial-")
    still = cli("cache", "rm", "--all")  # its process (this one) is still running
    assert clean(still, 0) == "" and still.stdout.startswith("nothing to remove") and left.exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    left = left.rename(left.with_name(re.sub(r"partial-\d+-", f"partial-{gone}-", left.name)))
    result = cli("cache", "rm", "--all")
    assert clean(result, 0) == "" and not left.exists()
    assert result.stdout.startswith("removed what interrupted conversions left (")


def test_cache_rm_of_an_entry_that_is_a_link_removes_the_link_only(model_dir, tmp_path):
    """An entry moved to another disk and linked back: `cache rm` removes the link (it said
    'cannot remove: Cannot call rmtree on a symbolic link', yet the entry had left the list)."""
    from aim_mlx import cache

    moved = tmp_path / "big-disk" / "entry"
    shutil.copytree(model_dir, moved)
    entry = cache.entry_dir("x--best--float32")
    entry.parent.mkdir(parents=True)
    entry.symlink_to(moved)
    result = cli("cache", "rm", "x--best--float32")
    assert clean(result, 0) == "" and result.stdout == "removed x--best--float32 (0.0 MB)\n"
    assert list(entry.parent.iterdir()) == [] and (moved / "config.json").is_file()


def test_weights_sharing_bytes_are_checked_against_memory_by_what_they_take(
    model_dir, tmp_path, monkeypatch
):
    """Every tensor of model.safetensors given the same bytes (MLX's reader allows it): a small
    file that would take the whole model's size once read, checked as such."""
    import struct

    from aim_mlx import memory

    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    raw = (folder / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    sizes = {
        k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k[0] != "_"
    }
    for key, size in sizes.items():
        header[key]["data_offsets"] = [0, size]
    text = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(
        struct.pack("<Q", len(text)) + text + bytes(max(sizes.values()))
    )
    file_size = (folder / "model.safetensors").stat().st_size
    assert file_size * 4 < sum(sizes.values())
    monkeypatch.setattr(memory, "device_memory", lambda: (2 * file_size, "memory"))
    with pytest.raises(memory.NotEnoughMemoryError, match=f"{folder}: the weights alone take"):
        aim_mlx.load(folder)


# ---- errors raised through the Python API ---------------------------------------------------

HEADS = dict(backbone=REF / "backbone.pth", head=REF / "head_best_layers.pth", num_heads=4)


def _bench(**options):
    from aim_mlx import bench

    bench.check(bench.BenchConfig(**options))


def _embed(net, **options):
    from aim_mlx.embed import embed

    embed(net, ROCKET, **options)


def _train(model, out, **options):
    from aim_mlx.probe import train

    train(model, REF / "images", out, **options)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda net, m, tmp: aim_mlx.load(m, head="x"),
            "head (--head) must be best, last or a trained head's folder, got 'x'",
        ),
        (
            lambda net, m, tmp: aim_mlx.load(REF, quantize_bits=3),
            "quantize_bits (--q-bits) must be 4 or 8, got 3",
        ),
        (
            lambda net, m, tmp: convert(tmp / "o", quantize=True, q_bits=3, **HEADS),
            "q_bits (--q-bits) must be 4 or 8, got 3",
        ),
        (
            lambda net, m, tmp: aim_mlx.classify(net, ROCKET, img_size=15),
            "img_size (--img-size) must be a positive multiple of 14, got 15",
        ),
        (
            lambda net, m, tmp: _embed(net, img_size=15),
            "img_size (--img-size) must be a positive multiple of 14, got 15",
        ),
        (
            lambda net, m, tmp: _bench(model="aim-600M", q_bits=3),
            "q_bits (--q-bits) must be 4 or 8, got 3",
        ),
        (
            lambda net, m, tmp: _bench(model=str(m), dtype="float16"),
            "model (--model) {m}: a converted folder is benchmarked as it was converted",
        ),
        (
            lambda net, m, tmp: _train(m, tmp / "h", probe_layers="x"),
            "probe_layers (--probe-layers) must be best, last or block indices like 3,4,5; got 'x'",
        ),
    ],
    ids=["load", "load-bits", "convert", "classify", "embed", "bench-bits", "bench", "train"],
)
def test_python_api_errors_name_the_python_argument(model_dir, tmp_path, call, message):
    """A Python caller passed `head=`, `q_bits=`, `img_size=`: the error names that argument
    (and the command line's option beside it), not only `--head` or `--q-bits`."""
    net = aim_mlx.load(model_dir)
    with pytest.raises(ValueError) as e:
        call(net, model_dir, tmp_path)
    assert str(e.value).startswith(message.format(m=model_dir))
