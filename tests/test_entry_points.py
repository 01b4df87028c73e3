"""The library's whole-job functions, through Python: embed_to_file, load_and_classify,
export_model, evaluate_model and evaluate_trained_head do what the commands do, checks and all,
without the command line."""

from __future__ import annotations

import importlib
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import REF
from mlx.utils import tree_flatten
from PIL import Image

import aim_mlx
from aim_mlx import distributed, resolve
from aim_mlx.embed import embed, embed_to_file, listing_path, read_listing
from aim_mlx.errors import OptionError, OutputError
from aim_mlx.evaluate import (
    DatasetError,
    check_eval_head,
    check_imagenet_head,
    evaluate,
    evaluate_model,
)
from aim_mlx.probe import ProbeError, Settings, train
from aim_mlx.probe.evaluate import evaluate_head, evaluate_trained_head
from aim_mlx.transforms import ImageError

pytestmark = pytest.mark.usefixtures("pin_cpu")

IMAGES = REF / "images"
ROCKET = IMAGES / "rocket.jpg"


@pytest.fixture
def no_load(monkeypatch):
    """Loading a model fails the test: what is checked must be checked before."""
    monkeypatch.setattr(resolve, "load", lambda *a, **k: pytest.fail("the model was loaded"))


# ---- embed_to_file ----------------------------------------------------------------------------


def test_embed_to_file_writes_what_embed_gives_and_reports_a_missing_input(model_dir, tmp_path):
    gone = str(tmp_path / "gone.png")
    inputs = [str(IMAGES), gone, str(ROCKET)]  # rocket.jpg a second time: one row
    out = tmp_path / "new" / "f.npy"
    result = embed_to_file(model_dir, inputs, out, layers="last", batch_size=3)
    expected = embed(aim_mlx.load(model_dir), inputs, layers="last", batch_size=3)
    found = [str(IMAGES / n) for n in ("camera.png", "chelsea.png", "coffee.png", "rocket.jpg")]
    assert read_listing(listing_path(out)) == found
    np.testing.assert_array_equal(np.load(out), expected.features)
    assert np.load(out).shape == (4, 64)
    assert result.files == [out, listing_path(out)]
    assert result.shape == (4, 64)
    assert result.errors == [(gone, "no such file or folder")]
    assert result.repeats == [(str(ROCKET), str(IMAGES / "rocket.jpg"))]


def test_embed_to_file_records_the_model_and_options_in_safetensors(model_dir, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "f.safetensors"
    result = embed_to_file(model_dir, ROCKET, out, layers=[1, -1], pool="tokens")
    assert result.files == [out] and result.shape == (1, 2, 256, 64)
    with safe_open(str(out), "np") as f:
        meta = f.metadata()
        features = f.get_tensor("features")
    assert json.loads(meta["paths"]) == [str(ROCKET)]
    assert (meta["model"], meta["layers"], meta["pool"]) == (str(model_dir), "[1, -1]", "tokens")
    want = embed(aim_mlx.load(model_dir), ROCKET, layers=[1, 7], pool="tokens").features
    np.testing.assert_array_equal(features, want)


def test_embed_to_file_takes_layers_as_any_iterable(model_dir, tmp_path):
    """A generator, read once, as `embed` takes it (it was read by a check first: no blocks)."""
    out = tmp_path / "f.npy"
    result = embed_to_file(model_dir, ROCKET, out, layers=(i for i in (1, -1)))
    assert result.shape == (1, 2, 64)
    want = embed(aim_mlx.load(model_dir), ROCKET, layers=[1, 7]).features
    np.testing.assert_array_equal(np.load(out), want)


def test_embed_to_file_keeps_an_existing_output_unless_forced(model_dir, tmp_path):
    out = tmp_path / "f.npy"
    out.write_bytes(b"theirs")
    with pytest.raises(OutputError, match=re.escape(f"{out} already exists")):
        embed_to_file(model_dir, ROCKET, out)
    assert out.read_bytes() == b"theirs" and not listing_path(out).exists()
    result = embed_to_file(model_dir, ROCKET, out, force=True)
    assert result.files == [out, listing_path(out)] and np.load(out).shape == (1, 64)


def test_embed_to_file_without_any_image_loads_no_model_and_writes_nothing(tmp_path, no_load):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "f.npy"
    result = embed_to_file("no-such-model", [tmp_path / "gone.jpg", empty], out)
    assert result.files == [] and result.shape == (0,)
    assert [path for path, _ in result.errors] == [str(tmp_path / "gone.jpg"), str(empty)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"pool": "max"}, "pool must be one of mean, tokens, got 'max'"),
        ({"layers": "abc"}, "layers must be head, last or block numbers"),
        ({"layers": [8]}, r"blocks \[8\] do not exist: the model has 8 blocks"),
        ({"batch_size": 0}, r"batch_size \(--batch-size\) must be a positive whole number"),
        ({"out": "f.txt"}, "the output must end in .safetensors or .npy"),
        ({"img_size": 15}, r"img_size \(--img-size\) must be a positive multiple of 14, got 15"),
    ],
    ids=["pool", "layers", "blocks", "batch-size", "suffix", "img-size"],
)
def test_embed_to_file_refuses_a_bad_option_before_any_work(
    model_dir, tmp_path, no_load, options, message
):
    out = tmp_path / "new" / options.pop("out", "f.npy")
    with pytest.raises(OptionError, match=message):
        embed_to_file(model_dir, ROCKET, out, **options)
    assert list(tmp_path.iterdir()) == []  # not even the output's folder


# ---- load_and_classify ------------------------------------------------------------------------


def test_load_and_classify_gives_classifys_rows(model_dir, tmp_path):
    from aim_mlx.classifier import load_and_classify

    gone = str(tmp_path / "gone.png")
    rows = load_and_classify(model_dir, [ROCKET, gone], k=3, batch_size=1)
    assert rows is not None and not isinstance(rows, list)  # rows as they come
    rows = list(rows)
    assert rows == aim_mlx.classify(aim_mlx.load(model_dir), [ROCKET, gone], k=3)
    assert [r["path"] for r in rows] == [str(ROCKET), gone] and len(rows[0]["top_k"]) == 3
    assert rows[1] == {"path": gone, "error": "no such file or folder"}
    (row,) = load_and_classify(model_dir, ROCKET, k=1)  # one path
    assert row["top_k"] == rows[0]["top_k"][:1]


def test_load_and_classify_without_any_image_loads_no_model(tmp_path, no_load):
    from aim_mlx.classifier import load_and_classify

    rows = list(load_and_classify("no-such-model", [tmp_path / "gone.jpg"]))
    assert rows == [{"path": str(tmp_path / "gone.jpg"), "error": "no such file or folder"}]
    for option, name in (({"k": 0}, "k (--top-k)"), ({"batch_size": 0}, "batch_size (--batc")):
        with pytest.raises(OptionError, match=re.escape(name)):  # before loading, not iterating
            load_and_classify("no-such-model", ROCKET, **option)
    with pytest.raises(OptionError, match=re.escape("img_size (--img-size) must be a positive")):
        load_and_classify("aim-600M", ROCKET, img_size=15)  # registered: its patch size is known


# ---- export_model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coreml():
    from aim_mlx.export import coreml

    try:
        coreml.require_coremltools()
    except coreml.ExportError:
        pytest.skip("coremltools is not installed (the `coreml` extra)")
    return coreml


@pytest.fixture(scope="module")
def hub_model(tmp_path_factory) -> Path:
    """The fixture converted from its hub-style folder, under the name "tiny"."""
    from aim_mlx.convert import convert

    out = tmp_path_factory.mktemp("hub") / "fixture"
    return convert(out, hf_path=REF / "hf_repo", progress=False, name="tiny")


def test_export_model_writes_a_package_with_the_models_name(coreml, hub_model, tmp_path):
    import coremltools as ct

    out = tmp_path / "new" / "m.mlpackage"
    result = coreml.export_model(hub_model, out, precision="float32", progress=False)
    assert result.path == out and (out / "Manifest.json").is_file()
    meta = ct.models.MLModel(str(out), skip_model_load=True).get_spec().description.metadata
    assert meta.userDefined["aim_mlx.model"] == "tiny"
    assert "pytorch_model.bin" in meta.userDefined["aim_mlx.source"]
    assert result.dequantized_bits is None
    params = sum(v.size for _, v in tree_flatten(aim_mlx.load(hub_model).parameters()))
    assert 0.9 * 4 * params < result.weight_bytes < 1.1 * 4 * params  # float32 weights


def test_export_model_keeps_an_existing_package_unless_forced(coreml, hub_model, tmp_path):
    out = tmp_path / "m.mlpackage"
    out.mkdir()
    (out / "Manifest.json").write_text("theirs")
    with pytest.raises(coreml.ExportError, match=re.escape(f"{out} already exists")):
        coreml.export_model(hub_model, out, precision="float32", progress=False)
    assert (out / "Manifest.json").read_text() == "theirs"
    coreml.export_model(hub_model, out, precision="float32", force=True, progress=False)
    assert (out / "Manifest.json").read_text() != "theirs"


def test_export_model_names_a_quantized_models_bits(coreml, tmp_path):
    from aim_mlx.convert import convert

    q4 = convert(tmp_path / "q4", hf_path=REF / "hf_repo", quantize=True, q_bits=4,
                 q_group_size=32, progress=False)  # fmt: skip
    out = tmp_path / "q.mlpackage"
    result = coreml.export_model(q4, out, precision="float32", progress=False)
    assert result.dequantized_bits == 4 and out.is_dir()


def test_export_model_runs_in_one_process(tmp_path, monkeypatch, no_load):
    """Under mlx.launch each rank would write the package: refused on every rank, first."""
    monkeypatch.setattr(distributed, "size", lambda: 2)
    from aim_mlx.export.coreml import export_model  # without coremltools too

    with pytest.raises(distributed.DistributedError, match=re.escape(
            "export_model (aim-mlx export coreml) runs in one process: start it without "
            "mlx.launch")):  # fmt: skip
        export_model("aim-600M", tmp_path / "new" / "m.mlpackage", compress="zip")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"precision": "float8"}, "ExportError", "precision must be one of"),
        ({"compress": "zip"}, "ExportError", "compress must be one of"),
        ({"precision": "float32", "sample_paths": [ROCKET]}, "ExportError", "float32 package"),
        ({"sample_paths": ["NOTES"]}, "ImageError", "notes.jpg"),
        ({"out": "m.zip"}, "ExportError", "the output must end in .mlpackage"),
        ({"img_size": 15}, "ExportError", "img_size must be a positive multiple of the patch"),
    ],
    ids=["precision", "compress", "float32-sample", "unreadable-sample", "suffix", "img-size"],
)
def test_export_model_refuses_a_bad_option_before_loading(
    coreml, tmp_path, no_load, options, error, message
):
    notes = tmp_path / "notes.jpg"
    notes.write_text("not an image")
    options["sample_paths"] = [
        notes if p == "NOTES" else p for p in options.get("sample_paths", [])
    ]
    out = tmp_path / "new" / options.pop("out", "m.mlpackage")
    exception = ImageError if error == "ImageError" else coreml.ExportError
    with pytest.raises(exception, match=message):
        coreml.export_model("aim-600M", out, progress=False, **options)
    assert not (tmp_path / "new" / "m.mlpackage").exists()


# ---- eval's head ------------------------------------------------------------------------------


def test_check_eval_head_refuses_what_has_no_imagenet_classes(tmp_path, model_dir):
    for head in (None, "best", "last"):
        check_eval_head(head)
    converted = re.escape(f"head (--head) {model_dir} is a converted model, not a head")
    with pytest.raises(OptionError, match=converted):
        check_eval_head(str(model_dir))
    with pytest.raises(OptionError, match="head \\(--head\\) must be best or last, got 'BEST'"):
        check_eval_head("BEST")
    trained = tmp_path / "my-head"
    trained.mkdir()
    (trained / "head.safetensors").write_bytes(b"")
    with pytest.raises(OptionError, match="a trained head: its classes are not ImageNet's"):
        check_eval_head(trained)
    with pytest.raises(OptionError) as refused:  # a function taking a model name, as -m does
        check_eval_head(trained)
    assert str(refused.value).endswith("aim_mlx.probe.evaluate.evaluate_trained_head)")


def test_a_trained_head_refused_by_eval_is_sent_to_a_function_that_exists():
    model = SimpleNamespace(args=SimpleNamespace(num_classes=2), labels=["cat", "dog"])
    with pytest.raises(OptionError) as refused:
        check_imagenet_head(model)
    named = str(refused.value).rsplit("(", 1)[1].rstrip(")")
    module, _, function = named.rpartition(".")
    assert module.startswith("aim_mlx.")
    assert callable(getattr(importlib.import_module(module), function))


# ---- evaluate_model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    """camera and chelsea in their top-1 class, coffee in its fourth, rocket in its 100th (the
    reference logits); a file that is no image. Top-1 2 of 4, top-5 3 of 4."""
    from test_classify import LOGITS, expected_top, imagenet_folder

    placement = {
        "camera.png": expected_top("camera.png")[0],
        "chelsea.png": expected_top("chelsea.png")[0],
        "coffee.png": expected_top("coffee.png")[3],
        "rocket.jpg": int(np.argsort(-LOGITS["rocket.jpg"])[99]),
    }
    root = imagenet_folder(tmp_path_factory.mktemp("imagenet") / "val", placement)
    (next(root.glob("*/rocket.jpg")).parent / "broken.png").write_bytes(b"not a png")
    return root


def test_evaluate_model_gives_what_evaluate_gives(model_dir, imagenet):
    evaluation = evaluate_model(model_dir, imagenet, batch_size=3)
    result = evaluation.result
    assert result == evaluate(aim_mlx.load(model_dir), imagenet, batch_size=3)
    assert (result.top1, result.top5, result.images, result.classes) == (50.0, 75.0, 4, 4)
    broken = str(next(imagenet.glob("*/broken.png")))
    assert [path for path, _ in result.failed] == [broken]
    assert (evaluation.model, evaluation.head) == (str(model_dir), "best")  # the folder's own
    assert (evaluation.dtype, evaluation.img_size) == ("float32", 224)
    assert evaluation.to_dict() == {
        "model": str(model_dir), "head": "best", "dtype": "float32", "img_size": 224,
        **result.to_dict(),
    }  # fmt: skip
    assert list(evaluation.to_dict())[:5] == ["model", "head", "dtype", "img_size", "top1"]


def test_evaluate_model_takes_the_image_size_and_a_limit(model_dir, imagenet):
    small = evaluate_model(model_dir, imagenet, img_size=112, limit=2)
    assert small.img_size == 112 and small.result.images == 2
    assert small.result == evaluate(aim_mlx.load(model_dir), imagenet, img_size=112, limit=2)
    model = aim_mlx.load(model_dir)
    for limit in (0, -1):  # 0 was no limit (4 images), -1 all images but one (3)
        with pytest.raises(OptionError, match=rf"limit \(--limit\) must be .*, got {limit}$"):
            evaluate(model, imagenet, limit=limit)


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"head": "BEST"}, OptionError, r"head \(--head\) must be best or last, got 'BEST'"),
        ({"head": "TRAINED"}, OptionError, r"head \(--head\) .* is a trained head"),
        ({"batch_size": 0}, OptionError, r"batch_size \(--batch-size\) must be a positive"),
        ({"limit": 0}, OptionError, r"limit \(--limit\) must be a positive whole number, got 0"),
        ({"limit": -1}, OptionError, r"limit \(--limit\) must be a positive whole number"),
        ({"img_size": 100}, OptionError, r"img_size \(--img-size\) must be a positive multiple"),
        ({"data": "cats"}, DatasetError, "sub-folders must be ImageNet-1k WordNet ids"),
    ],
    ids=["head", "trained-head", "batch-size", "limit", "negative-limit", "img-size", "data"],
)
def test_evaluate_model_refuses_a_bad_option_before_loading(
    imagenet, tmp_path, no_load, options, error, message
):
    if options.get("head") == "TRAINED":
        options["head"] = tmp_path / "my-head"
        options["head"].mkdir()
        (options["head"] / "head.safetensors").write_bytes(b"")
    data = options.pop("data", imagenet)
    if data == "cats":
        data = tmp_path / "cats"
        (data / "cats").mkdir(parents=True)
        (data / "cats" / "a.jpg").write_bytes(ROCKET.read_bytes())
    with pytest.raises(error, match=message):
        evaluate_model("aim-600M", data, **options)  # registered: its patch size is known


def test_evaluate_model_and_trained_head_give_none_on_other_ranks(
    model_dir, imagenet, trained, tmp_path, monkeypatch
):
    """Under mlx.launch a rank other than 0 does its share and gets None (rank 0 reports); it
    writes no picture."""
    monkeypatch.setattr(distributed, "is_root", lambda: False)
    assert evaluate_model(model_dir, imagenet) is None
    picture = tmp_path / "c.png"
    assert evaluate_trained_head(model_dir, trained.data, trained.out, confusion=picture) is None
    assert not picture.exists()


# ---- evaluate_trained_head --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory):
    """A linear head trained for one epoch on three classes of drawn colours (four images each);
    `.data` is the folder."""
    from test_probe import draw_dataset

    root = tmp_path_factory.mktemp("probe")
    data = draw_dataset(root / "data", per_class=4, size=32)
    for name in sorted(p.name for p in data.iterdir())[3:]:
        shutil.rmtree(data / name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIM_MLX_CACHE", str(root / "cache"))  # the feature cache
        settings = Settings(kind="linear", epochs=1)
        result = train(model_dir, data, root / "head", settings=settings, log=lambda _: None)
    result.data = data
    return result


def test_evaluate_trained_head_gives_what_evaluate_head_gives(model_dir, trained, tmp_path):
    picture = tmp_path / "new" / "c.png"
    evaluation = evaluate_trained_head(
        model_dir, trained.data, trained.out, batch_size=5, confusion=picture
    )
    result = evaluation.result
    want = evaluate_head(aim_mlx.load(model_dir, head=trained.out), trained.data, batch_size=5)
    assert result.to_dict() == want.to_dict()
    assert result.labels == trained.classes and len(trained.classes) == 3
    assert (result.images, result.classes, result.failed) == (12, 3, [])
    assert result.confusion.sum(axis=1).tolist() == [4, 4, 4]
    assert result.top1 == 100 * np.trace(result.confusion) / 12 and result.top5 is None
    assert evaluation.to_dict() == {
        "model": str(model_dir), "head": str(trained.out), "dtype": "float32", "img_size": 224,
        **result.to_dict(),
    }  # fmt: skip
    with Image.open(picture) as img:
        assert img.format == "PNG"
    assert [p.name for p in picture.parent.iterdir()] == ["c.png"]


def test_evaluate_trained_head_keeps_an_existing_picture_unless_forced(
    model_dir, trained, tmp_path, monkeypatch
):
    picture = tmp_path / "c.png"
    picture.write_bytes(b"theirs")
    with monkeypatch.context() as mp:  # refused before the model is loaded
        mp.setattr(resolve, "load", lambda *a, **k: pytest.fail("the model was loaded"))
        with pytest.raises(OutputError, match=re.escape(f"{picture} already exists")):
            evaluate_trained_head(model_dir, trained.data, trained.out, confusion=picture)
    assert picture.read_bytes() == b"theirs"
    evaluate_trained_head(model_dir, trained.data, trained.out, confusion=picture, force=True)
    with Image.open(picture) as img:
        assert img.format == "PNG"


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"head": None}, OptionError,
         r"head \(--head\) must be a trained head's folder \(from `probe train`\)$"),
        ({"head": "best"}, OptionError,
         r"head \(--head\) must be a trained head's folder \(from `probe train`\), got 'best'"),
        ({"head": "NOWHERE"}, OptionError, r"head \(--head\) must be best, last or a trained"),
        ({"confusion": "c.jpg"}, OptionError,
         r"confusion \(--confusion\) must end in .png, got '.*c.jpg'"),
        ({"confusion": "DATA/c.png"}, OutputError, "is inside the input"),
        ({"batch_size": 0}, OptionError, r"batch_size \(--batch-size\) must be a positive"),
        ({"data": "OTHER"}, ProbeError, r"class sub-folder\(s\) \['purple'\] are not classes"),
    ],
    ids=["no-head", "keyword", "no-folder", "suffix", "inside-data", "batch-size", "classes"],
)  # fmt: skip
def test_evaluate_trained_head_refuses_a_bad_option_before_loading(
    trained, tmp_path, no_load, options, error, message
):
    data = trained.data
    if options.get("data") == "OTHER":
        data = tmp_path / "other"
        shutil.copytree(trained.data / trained.classes[0], data / "purple")
    where = {"NOWHERE": tmp_path / "nowhere", "DATA/c.png": trained.data / "c.png"}
    options = {k: where.get(v, v) if isinstance(v, str) else v for k, v in options.items()}
    if isinstance(options.get("confusion"), str):
        options["confusion"] = tmp_path / "new" / options["confusion"]
    options = {"head": trained.out, **options, "data": data}
    with pytest.raises(error, match=message):
        evaluate_trained_head("no-such-model", options.pop("data"), **options)
    assert not (tmp_path / "new").exists() and not (trained.data / "c.png").exists()


# ---- under mlx.launch ---------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["embed", "classify", "eval", "probe-eval"])
def test_the_ranks_share_the_cores_before_the_model_is_loaded(
    model_dir, imagenet, trained, tmp_path, monkeypatch, entry
):
    """`distributed.group()` joins the ranks and divides the machine's cores between them: each
    entry point asks for it before it loads the model (which it then runs on those cores)."""
    from aim_mlx.classifier import load_and_classify

    calls, group, load = [], distributed.group, resolve.load
    monkeypatch.setattr(distributed, "group", lambda: calls.append("group") or group())
    monkeypatch.setattr(resolve, "load", lambda *a, **k: calls.append("load") or load(*a, **k))
    run = {
        "embed": lambda: embed_to_file(model_dir, ROCKET, tmp_path / "f.npy"),
        "classify": lambda: list(load_and_classify(model_dir, ROCKET)),
        "eval": lambda: evaluate_model(model_dir, imagenet, limit=1),
        "probe-eval": lambda: evaluate_trained_head(model_dir, trained.data, trained.out),
    }
    run[entry]()
    assert "group" in calls[: calls.index("load")]


# ---- a model or a folder that is not a path -----------------------------------------------------


@pytest.mark.parametrize("model", [None, "", 600])
@pytest.mark.parametrize("entry", ["embed", "classify", "export", "eval", "probe-eval"])
def test_a_model_that_is_not_a_path_is_one_clear_error(entry, model, tmp_path, no_load):
    """None was a TypeError from pathlib in embed_to_file; "" would be the working folder."""
    from aim_mlx.classifier import load_and_classify
    from aim_mlx.export.coreml import export_model

    calls = {
        "embed": lambda: embed_to_file(model, ROCKET, tmp_path / "f.npy"),
        "classify": lambda: load_and_classify(model, ROCKET),
        "export": lambda: export_model(model, tmp_path / "m.mlpackage"),
        "eval": lambda: evaluate_model(model, IMAGES),
        "probe-eval": lambda: evaluate_trained_head(model, IMAGES, tmp_path),
    }
    with pytest.raises(
        OptionError, match=rf"^model must be a model name \(aim-600M, .*got {model!r}"
    ):
        calls[entry]()
    assert list(tmp_path.iterdir()) == []


def test_a_data_folder_that_is_not_a_path_is_one_clear_error(trained, tmp_path, no_load):
    """None was a TypeError from pathlib ("expected str, bytes or os.PathLike object")."""
    with pytest.raises(OptionError, match="^the data folder must be a path, got None$"):
        evaluate_model("aim-600M", None)
    with pytest.raises(OptionError, match="^the evaluation folder must be a path, got None$"):
        evaluate_trained_head("aim-600M", None, trained.out)
