"""The model registry (built-in, registered, from a file), the cache layout and `aim_mlx.load`."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURE_CONFIG, REF, rel_err, run_cli
from hub_server import HubServer
from mlx.utils import tree_flatten
from test_hub import FILES, REPO, registry_entry

import aim_mlx
from aim_mlx import cache, registry
from aim_mlx.convert.converter import ConversionError
from aim_mlx.errors import OptionError
from aim_mlx.loader import read_config
from aim_mlx.models import AIM
from aim_mlx.resolve import default_dtype, models_overview, resolve

# Names, the cache and the CPU's default dtype: on the CPU whatever MLX's default device is.
pytestmark = pytest.mark.usefixtures("pin_cpu")

SHAPES = json.loads((REF / "official_parameter_shapes.json").read_text())


@pytest.fixture(autouse=True)
def private_registry(private_cache, monkeypatch):
    """No registry file from the environment; what a test registers is forgotten after it."""
    monkeypatch.delenv(registry.REGISTRY_ENV, raising=False)
    yield
    registry._registered.clear()


@pytest.mark.parametrize("name", ["aim-600M", "aim-1B", "aim-3B", "aim-7B"])
def test_official_specs_agree_with_the_official_parameter_shapes(name):
    spec = registry.get(name.lower())  # names are case-insensitive
    shapes = SHAPES[name]
    floats = {k: np.prod(s) for k, (s, dtype) in shapes.items() if dtype == "float32"}
    backbone = sum(n for k, n in floats.items() if not k.startswith("head."))
    head = sum(n for k, n in floats.items() if k.startswith("head."))
    assert registry.estimated_sizes(spec) == (4 * backbone, 4 * head)
    assert spec.params == SHAPES[f"{name}:num_params"]
    args = spec.model_args("best")
    assert args.embed_dim == shapes["head.cls_token"][0][-1]
    assert args.num_blocks == 1 + max(
        int(k.split(".")[2]) for k in shapes if k.startswith("trunk.blocks.")
    )
    last = spec.model_args("last").probe_layers
    assert last == tuple(range(args.num_blocks - 6, args.num_blocks))
    assert spec.repo == "apple/AIM" and spec.backbone.filename.endswith("_attnprobe_backbone.pth")


def test_registry_file_and_register_api(tmp_path, monkeypatch):
    with pytest.raises(registry.RegistryError, match="unknown model 'aim-tiny'; known models"):
        registry.get("aim-tiny")
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [registry_entry()]}))
    monkeypatch.setenv(registry.REGISTRY_ENV, str(path))
    assert registry.get("AIM-TINY").model_args("last").probe_layers == (2, 3, 4, 5, 6, 7)
    with pytest.raises(registry.RegistryError, match="already registered"):
        registry.register(registry_entry())
    spec = registry.register({**registry_entry(), "name": "aim-tiny-2"})
    assert registry.get("aim-tiny-2") is spec

    path.write_text("{not json")
    with pytest.raises(registry.RegistryError, match="cannot read the registry file"):
        registry.all_models()
    bad = registry_entry()
    bad["backbone"]["sha256"] = "xyz"
    with pytest.raises(registry.RegistryError, match="sha256 must be 8 to 64 lowercase hex"):
        registry.register(bad)
    bad = registry_entry()
    del bad["heads"]
    with pytest.raises(registry.RegistryError, match="registry entry 'aim-tiny': missing heads"):
        registry.register(bad)


def test_register_replace_takes_the_place_of_a_name_in_another_case():
    """Names are case-insensitive: the replacement was added beside the old entry, which
    lookups kept returning."""
    registry.register(registry_entry())  # aim-tiny
    new = registry.register({**registry_entry(), "name": "AIM-Tiny", "repo": "me/x"}, replace=True)
    assert registry.get("aim-tiny") is new and registry.get("AIM-Tiny") is new
    assert [n for n in registry.all_models() if n.lower() == "aim-tiny"] == ["aim-tiny"]
    builtin = registry.register({**registry_entry(), "name": "AIM-600m"}, replace=True)
    assert registry.get("aim-600M") is builtin


def test_load_by_name_downloads_converts_and_matches_the_reference(tmp_path):
    registry.register(registry_entry())
    server = HubServer({REPO: {f: REF / f for f in FILES}}).start()
    try:
        hf = tmp_path / "hf"
        model = aim_mlx.load("aim-tiny", endpoint=server.url, hf_cache_dir=hf, progress=False)
        logits = np.array(model(mx.array(np.load(REF / "input.npy"))))
        assert rel_err(logits, np.load(REF / "logits_best.npy")) < 1e-5
        assert model.dtype == mx.float32 == getattr(mx, default_dtype())  # the CPU default
        entry = cache.entry_dir("aim-tiny--best--float32")
        assert cache.is_current(entry)

        last = aim_mlx.load("aim-tiny", head="last", endpoint=server.url, hf_cache_dir=hf)
        logits = np.array(last(mx.array(np.load(REF / "input.npy"))))
        assert rel_err(logits, np.load(REF / "logits_last.npy")) < 1e-5
        assert len(server.downloads("backbone.pth")) == 1  # shared by both heads

        half = resolve("aim-tiny", dtype="float16", endpoint=server.url, hf_cache_dir=hf)
        assert half.name == "aim-tiny--best--float16"
        q8 = aim_mlx.load("aim-tiny", quantize_bits=8, endpoint=server.url, hf_cache_dir=hf)
        q8_config = read_config(cache.entry_dir("aim-tiny--best--float32--q8g64"))
        assert q8_config["quantization"]["bits"] == 8
        logits = np.array(q8(mx.array(np.load(REF / "input.npy"))))
        assert rel_err(logits, np.load(REF / "logits_best.npy")) < 0.05
        keys = [e.key for e in cache.list_entries()]
        assert keys == [
            "aim-tiny--best--float16",
            "aim-tiny--best--float32",
            "aim-tiny--best--float32--q8g64",
            "aim-tiny--last--float32",
        ]
        assert cache.remove("aim-tiny--best--float16") > 0
        assert not half.exists()
    finally:
        server.stop()


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    assert cache.cache_root() == tmp_path / "cache"
    monkeypatch.delenv(cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(cache.sys, "platform", "linux")
    assert cache.cache_root() == tmp_path / "xdg" / "aim-mlx"
    monkeypatch.setattr(cache.sys, "platform", "darwin")
    assert cache.cache_root().parts[-3:] == ("Library", "Caches", "aim-mlx")
    assert cache.entry_key("aim-1B", "last", "float16", {"bits": 4, "group_size": 64}) == (
        "aim-1B--last--float16--q4g64"
    )


def test_folder_of_official_layout_checkpoints_uses_the_registry_architecture(tmp_path):
    """A folder of .pth files named as a registered model's files converts without options."""
    registry.register(registry_entry())  # aim-tiny: backbone.pth, head_{best,last}_layers.pth
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in FILES:
        (folder / name).symlink_to(REF / name)
    for head in ("best", "last"):
        model = aim_mlx.load(folder, head=head, progress=False)
        assert model.args.num_heads == 4
        logits = np.array(model(mx.array(np.load(REF / "input.npy"))))
        assert rel_err(logits, np.load(REF / f"logits_{head}.npy")) < 1e-5
    assert sorted(e.key.split("--", 1)[1] for e in cache.list_entries()) == [
        "best--float32",
        "last--float32",
    ]


def test_malformed_config_is_reported_as_such(tmp_path):
    """A model folder whose config.json is broken is named as such, not as "no config.json"."""
    from aim_mlx.loader import ModelLoadError

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"format_version": 1,')  # cut short
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"config.json: not valid JSON"):
        aim_mlx.load(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match=r"config.json: expected a JSON object"):
        aim_mlx.load(folder)


def test_cache_entry_with_broken_config_is_not_current(tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path))
    entry = cache.entry_dir("aim-tiny--best--float32")
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{not json")
    (entry / "model.safetensors").write_bytes(b"x")
    (listed,) = cache.list_entries()
    assert listed.config is None and listed.current is False


def test_weights_larger_than_memory_are_refused_before_any_download(tmp_path, monkeypatch):
    """A model whose weights exceed the device's whole memory is refused by name before the
    hub is asked for anything; a converted folder by its tensors' size."""
    from aim_mlx import memory
    from aim_mlx.loader import load_model
    from aim_mlx.probe.head import load_trunk

    float32_bytes = sum((REF / f).stat().st_size for f in FILES[:2])  # backbone + best head
    limit = int(float32_bytes * 0.75)  # float32 does not fit, float16 (half) does
    monkeypatch.setattr(memory, "device_memory", lambda: (limit, "memory"))
    registry.register(registry_entry())
    server = HubServer({REPO: {f: REF / f for f in FILES}}).start()
    try:
        where = dict(endpoint=server.url, hf_cache_dir=tmp_path / "hf", progress=False)
        with pytest.raises(memory.NotEnoughMemoryError, match="aim-tiny in float32: the weights"):
            aim_mlx.load("aim-tiny", dtype="float32", **where)
        with pytest.raises(memory.NotEnoughMemoryError, match="aim-tiny in float32"):
            load_trunk("aim-tiny", "float32", **where)  # a trained head's trunk (probe)
        assert server.requests == [] and cache.list_entries() == []
        assert aim_mlx.load("aim-tiny", dtype="float16", **where).dtype == mx.float16
        converted = resolve("aim-tiny", dtype="float32", **where)  # converting needs no room
    finally:
        server.stop()
    with pytest.raises(memory.NotEnoughMemoryError, match=f"{converted}: the weights alone"):
        load_model(converted)
    for off in ("off", "none", "0", "False"):  # as every on/off setting takes them
        monkeypatch.setenv(memory.SKIP_VARIABLE, off)
        assert load_model(converted).dtype == mx.float32


def test_a_changed_registry_entry_is_converted_again(tmp_path, monkeypatch):
    """The cache key is the name: an entry converted from other files (or other probe layers)
    than the registry now names is converted again, not served as the new model."""
    x = mx.array(np.load(REF / "input.npy"))
    server = HubServer({REPO: {f: REF / f for f in FILES}}).start()
    path = tmp_path / "models.json"
    monkeypatch.setenv(registry.REGISTRY_ENV, str(path))

    def run(entry) -> np.ndarray:
        path.write_text(json.dumps({"models": [entry]}))
        model = aim_mlx.load("aim-tiny", endpoint=server.url, hf_cache_dir=tmp_path / "hf")
        return np.array(model(x))

    first, second = registry_entry(), registry_entry()
    second["heads"]["best"] = second["heads"]["last"]  # another head file under "best"
    second["probe_layers"]["best"] = second["probe_layers"]["last"]
    try:
        assert rel_err(run(first), np.load(REF / "logits_best.npy")) < 1e-5
        assert [e.current for e in cache.list_entries()] == [True]
        path.write_text(json.dumps({"models": [second]}))  # another head file (SHA-256)
        assert [e.current for e in cache.list_entries()] == [False]
        assert rel_err(run(second), np.load(REF / "logits_last.npy")) < 1e-5
        entry = cache.entry_dir("aim-tiny--best--float32")
        assert [s["file"] for s in read_config(entry)["sources"]][1] == "head_last_layers.pth"
        # same files, other probe layers: converted again with the new ones
        third = {**second, "probe_layers": {**second["probe_layers"], "best": [1, 2, 3, 4, 5, 7]}}
        path.write_text(json.dumps({"models": [third]}))
        assert [e.current for e in cache.list_entries()] == [False]  # `cache list` says so
        run(third)
        assert [e.current for e in cache.list_entries()] == [True]
        assert read_config(entry)["probe_layers"] == [1, 2, 3, 4, 5, 7]
        assert len(server.downloads("backbone.pth")) == 1  # the downloads are reused
        run(third)  # unchanged: reused, not converted again
        assert cache.is_current(entry, registry.get("aim-tiny").files("best"))
    finally:
        server.stop()


def entry_with(**changes) -> dict:
    return {**registry_entry(), **changes}


@pytest.mark.parametrize(
    "content, message",
    [
        ({"model": []}, r'expected \{"models": \[...\]\} or a list of entries'),
        ({"models": {"x": 1}}, r'expected \{"models": \[...\]\}'),
        ("str", r'expected \{"models": \[...\]\}'),
        ({"models": [1]}, "a registry entry must be an object, got 1"),
        ([entry_with(name="AIM-600M")], "'AIM-600M' is taken by a built-in model \\(aim-600M\\)"),
        ([registry_entry(), entry_with(name="AIM-tiny")], "taken by another entry in the file"),
        ([entry_with(repo=5)], "entry 'aim-tiny': repo must be a string, got 5"),
        ([entry_with(repo="a b")], "repo must be a hub repo id like apple/AIM"),
        ([entry_with(name="aim-tiny--ft")], "needs a name \\(ASCII letters, digits, ._-, no"),
        ([entry_with(name="aimé")], "needs a name \\(ASCII letters, digits, ._-, no --\\)"),
        # ids the hub refuses (a traceback on download); a revision out of its refs/ folder
        ([entry_with(repo="../..")], "repo must be a hub repo id like apple/AIM"),
        ([entry_with(repo="me/.x")], "repo must be a hub repo id"),
        ([entry_with(repo="me--x/y")], "repo must be a hub repo id"),
        ([entry_with(repo="me/model.git")], "repo must be a hub repo id"),
        ([entry_with(revision="../../../etc")], "revision must be a branch, tag or commit"),
        ([entry_with(revision="/tmp/x")], "revision must be a branch, tag or commit"),
        ([entry_with(params="lots")], "params must be an integer, got 'lots'"),
        ([entry_with(heads={"best": "x.pth"})], "a file must be an object with filename"),
        ([entry_with(arch={"num_blocks": 8, "num_heads": 4})], "missing embed_dim"),
        ([entry_with(arch={"embed_dim": 64, "num_blocks": 8, "num_heads": 0})], "num_heads must"),
        ([entry_with(arch={"embed_dim": 64, "num_blocks": 8, "num_heads": 3})], "not divisible"),
        ([entry_with(probe_layers={"best": [1, 99], "last": [2]})], "probe layers \\[99\\]"),
        ([entry_with(probe_layers={"best": 3, "last": [2]})], "list of block indices, got 3"),
        (
            [entry_with(arch={"embed_dim": 64, "num_blocks": 8, "num_heads": 4, "mlp_ration": 4})],
            "arch has unknown key\\(s\\) mlp_ration; known: .*mlp_ratio",
        ),
        ([entry_with(top1={"best": "high"})], "top1 values must be numbers"),
        (
            [entry_with(backbone={"filename": "b.pth", "sha256": "af1ca2e5", "size": -5})],
            "entry 'aim-tiny': size must be a positive integer \\(bytes\\), got -5",
        ),
        (
            [entry_with(backbone={"filename": "../../x.pth", "sha256": "af1ca2e5"})],
            "filename must be a file's path inside the repo",
        ),
        (
            [entry_with(backbone={"filename": "a\\..\\b.pth", "sha256": "af1ca2e5"})],
            "filename must be a file's path inside the repo",
        ),
    ],
)
def test_a_malformed_registry_file_is_one_error_naming_it(tmp_path, monkeypatch, content, message):
    from click.testing import CliRunner

    from aim_mlx.cli import main

    path = tmp_path / "models.json"
    path.write_text(json.dumps(content))
    monkeypatch.setenv(registry.REGISTRY_ENV, str(path))
    with pytest.raises(registry.RegistryError, match=message) as e:
        registry.all_models()
    assert str(e.value).startswith(f"the registry file {path} (AIM_MLX_REGISTRY): ")
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert f"Error: the registry file {path}" in result.stderr


@pytest.mark.parametrize("model", [None, 3, ["aim-600M"]])
def test_a_model_that_is_not_a_name_nor_a_path_is_one_error(model):
    # None was a TypeError from pathlib, registry.get(None) an AttributeError
    with pytest.raises(registry.RegistryError, match=r"a model name must be a string, got"):
        registry.get(model)
    with pytest.raises(OptionError, match=r"model must be a model name \(aim-600M, "):
        aim_mlx.load(model)


def test_an_empty_model_name_is_not_the_working_folder(tmp_path, monkeypatch):
    """`-m "$MODEL"` with MODEL unset: a usage error, not a conversion of the working folder."""
    from click.testing import CliRunner

    from aim_mlx.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(OptionError, match=r"model must be a model name .* or a folder, got ''"):
        aim_mlx.load("")
    for args in (["cache", "add", ""], ["embed", str(tmp_path), "-o", "e.npy", "-m", ""]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "or a folder, got ''" in result.stderr, result.output


def test_checkpoints_named_as_a_registered_model_but_of_another_shape_are_refused(tmp_path):
    """The file names set the head count and probe layers: on other weights that made a model
    of the wrong head count without a word (here 2 heads of 32 for the fixture's 4 of 16)."""
    wide = {**FIXTURE_CONFIG["config"], "embed_dim": 128, "num_heads": 2}
    entry = registry_entry()
    entry.update(name="aim-wide", arch=wide)
    entry["backbone"] = {**entry["backbone"], "filename": "wide_backbone.pth"}
    entry["heads"] = {
        v: {**f, "filename": f"wide_head_{v}_layers.pth"} for v, f in entry["heads"].items()
    }
    registry.register(entry)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "wide_backbone.pth").symlink_to(REF / "backbone.pth")
    (folder / "wide_head_best_layers.pth").symlink_to(REF / "head_best_layers.pth")
    with pytest.raises(ConversionError) as e:
        aim_mlx.load(folder, progress=False)
    assert str(e.value).startswith(
        f"{folder}: wide_backbone.pth is aim-wide's file name, but its weights are not "
        "aim-wide's (embed_dim 64, 8 blocks; aim-wide has 128 and 8); if they are another "
        "model's, rename the files. Convert it with `aim-mlx convert`"
    )
    assert cache.list_entries() == []  # nothing converted
    # a damaged file under that name: the ConversionError of any damaged checkpoint folder
    (folder / "wide_backbone.pth").unlink()
    (folder / "wide_backbone.pth").write_bytes((REF / "backbone.pth").read_bytes()[:5000])
    with pytest.raises(ConversionError, match="a damaged or truncated zip file"):
        aim_mlx.load(folder, progress=False)


@pytest.mark.parametrize(
    "repo",
    ["a", "me/x", "o" * 40 + "/" + "m" * 60, "o" * 96 + "/" + "m" * 96, "me/" + "m" * 97, "x.git"]
    + ["me/model.git", "me/.x", "me/x-", "_a/b_", "a/b/c", "me--x/y", "a..b", ""],
)
def test_repo_ids_are_those_the_hub_accepts(repo):
    """As huggingface_hub's validate_repo_id (96 characters a part, not in all; no .git end):
    an id it refuses was a traceback on first use, one it takes must not be refused."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
        accepted = True
    except HFValidationError:
        accepted = False
    assert registry._is_repo_id(repo) == accepted


def test_models_shows_the_parameter_count_of_an_entry_without_one(tmp_path, monkeypatch):
    """A registry entry need not state `params`: `aim-mlx models` counts the architecture's
    (it printed "params ?")."""
    assert "params" not in registry_entry()
    registry_file = tmp_path / "registry.json"
    registry_file.write_text(json.dumps({"models": [registry_entry()]}))
    monkeypatch.setenv(registry.REGISTRY_ENV, str(registry_file))
    args = registry.get("aim-tiny").model_args("best")
    built = sum(v.size for _, v in tree_flatten(AIM(args).parameters()))
    [row] = [r for r in models_overview() if r["name"] == "aim-tiny"]
    assert row["params"] == built
    result = run_cli("models")
    assert f"aim-tiny  ({built / 1e6:.2f}M params;" in result.stdout
