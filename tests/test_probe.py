"""Your own classifier: probe train / eval, heads in folders, classify / load / Core ML with them.

The dataset is drawn by `benchmarks/probe_lr.py`'s `draw`: five colour classes, each image a
random stripe texture (angle, frequency, phase) with colour, brightness, contrast and
pixel-noise jitter. The fixture's random trunk separates colours, not the textures: the head
has to learn which features matter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import (
    REF,
    appears_before_publish,
    convert_fixture,
    exited_cleanly,
    nan_weights,
    pending_operations,
)
from conftest import run_cli as cli
from mlx.utils import tree_flatten, tree_unflatten
from PIL import Image

import aim_mlx
from aim_mlx.cli import main
from aim_mlx.convert import convert
from aim_mlx.errors import OptionError
from aim_mlx.evaluate import evaluate
from aim_mlx.probe import ProbeError, Settings, train
from aim_mlx.probe import features as feature_cache
from aim_mlx.probe import head as head_lib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from probe_lr import COLOURS, draw  # noqa: E402


def draw_dataset(root: Path, per_class: int = 20, seed: int = 10, size: int = 64) -> Path:
    return draw(root, per_class, colour_noise=0.08, seed=seed, size=size)


pytestmark = pytest.mark.usefixtures("shared_cache")


@pytest.fixture(scope="module")
def model_dir(workdir) -> Path:
    """The fixture converted beside the module's cache, named aim-tiny (not conftest's)."""
    return convert_fixture(workdir / "aim-tiny", name="aim-tiny")


@pytest.fixture(scope="module")
def data(workdir) -> Path:
    return draw_dataset(workdir / "data")


@pytest.fixture(scope="module")
def heads(workdir, model_dir, data, tmp_path_factory):
    """Both kinds trained with the defaults (the cache env is set by hand: module scope)."""
    with pytest.MonkeyPatch.context() as mp, mx.stream(mx.cpu):
        mp.setenv("AIM_MLX_CACHE", str(workdir / "cache"))
        lines = []
        return {
            kind: train(
                model_dir, data, workdir / f"head-{kind}", settings=Settings(kind=kind),
                log=lines.append,
            )
            for kind in ("attention", "linear")
        }  # fmt: skip


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("kind", ["attention", "linear"])
def test_head_learns_the_drawn_classes(heads, kind):
    result = heads[kind]
    assert result.best.val_top1 >= 95.0
    assert (result.train_images, result.val_images) == (80, 20)  # 20% of each class held out
    assert result.history[0].train_top1 < 80.0  # it did have to learn
    assert result.best.epoch == max(
        result.history, key=lambda s: (s.val_top1, -s.val_loss)
    ).epoch  # fmt: skip
    config = json.loads((result.out / "config.json").read_text())
    assert config["classes"] == sorted(COLOURS)
    assert config["kind"] == kind and config["probe_layers"] == [1, 2, 3, 4, 5, 6]
    assert config["trunk"]["sha256"] == sha256(REF / "backbone.pth")
    assert config["metrics"]["val_top1"] == result.best.val_top1
    assert config["metrics"]["best_epoch"] == result.best.epoch
    assert config["training"]["seed"] == 0 and config["training"]["epochs"] == 30
    # earlier heads: "AdamW", then "AdamW, bias-corrected" (decay on every parameter)
    optimizer = "AdamW, bias-corrected, no decay of biases and the query"
    assert config["training"]["optimizer"] == optimizer


def test_training_is_seeded(heads, model_dir, data, tmp_path):
    again = train(model_dir, data, tmp_path / "again", settings=Settings(kind="linear"),
                  log=lambda _: None)  # fmt: skip
    assert again.extracted == 0  # every image came from the feature cache
    a = mx.load(str(heads["linear"].out / "head.safetensors"))
    b = mx.load(str(again.out / "head.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), k


def test_training_does_not_reseed_mlxs_global_generator(heads, model_dir, data, tmp_path):
    """The seed decides the head (its initial weights are drawn from a key of their own), and
    a user's random numbers after training are those the user's own seed gives: training
    neither reseeds MLX's generator nor draws from it."""
    for user_seed in (1, 2):
        mx.random.seed(user_seed)
        expected = np.array(mx.random.uniform(shape=(4,)))
        mx.random.seed(user_seed)
        res = train(model_dir, data, tmp_path / f"h{user_seed}",
                    settings=Settings(kind="attention", epochs=1), log=lambda _: None)  # fmt: skip
        np.testing.assert_array_equal(np.array(mx.random.uniform(shape=(4,))), expected)
        head = mx.load(str(res.out / "head.safetensors"))
        if user_seed == 1:
            first = head
    for k in first:
        assert np.array_equal(np.array(first[k]), np.array(head[k])), k


def test_the_optimizer_is_adamw_as_pytorch_defines_it():
    """Two steps against AdamW written out (bias-corrected moments, decoupled decay, the
    cosine schedule's rate at steps 0 and 1). MLX's AdamW leaves the correction out by
    default: its first step was 3.2x lr. Weight matrices decay; biases and the attention
    head's query do not (they decayed too)."""
    from aim_mlx.probe.training import make_optimizer

    lr, wd, total = 1e-2, 0.5, 40
    opt = make_optimizer(Settings(lr=lr, weight_decay=wd, warmup_epochs=0, epochs=1), total)
    shapes = {"linear.weight": (1, 3), "linear.bias": (3,), "cls_token": (1, 1, 3)}

    def tree(values):
        return tree_unflatten([(k, mx.array(values.reshape(s))) for k, s in shapes.items()])

    start = np.array([1.0, -2.0, 0.5])
    p = tree(start.astype(np.float32))
    grads = [np.array([0.3, -0.004, 2.0]), np.array([-0.1, 0.02, 1.0])]
    want = {k: np.array(start, dtype=np.float64) for k in shapes}
    m, v = 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        p = opt.apply_gradients(tree(g.astype(np.float32)), p)
        rate = lr * 0.01 + (lr - lr * 0.01) * 0.5 * (1 + np.cos(np.pi * (t - 1) / total))
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g**2
        step = rate * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        for k in want:
            decay = 1 - rate * wd if k == "linear.weight" else 1.0
            want[k] = want[k] * decay - step
    for k, got in tree_flatten(p):
        np.testing.assert_allclose(np.array(got).ravel(), want[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("classes", [7, 5])
def test_top5_counts_ranks_and_needs_more_than_five_classes(classes):
    """Logits are the features themselves: the label is ranked 1st, 4th and last."""
    import mlx.nn as nn

    from aim_mlx.probe.training import evaluate_features

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(classes, classes)
            self.linear.weight = mx.eye(classes)
            self.linear.bias = mx.zeros(classes)

        def __call__(self, x):
            return self.linear(x[:, 0])

    ranked = np.arange(classes, 0, -1, dtype=np.float32)  # class 0 first, the last class last
    labels = np.array([0, 3, classes - 1])
    features = {str(i): ranked[None] for i in range(3)}

    class Store:
        def load(self, keys):
            return np.stack([features[k] for k in keys])

    _, top1, top5 = evaluate_features(Head(), Store(), list(features), labels, 2)
    assert top1 == pytest.approx(100 / 3)
    assert top5 == (pytest.approx(200 / 3) if classes == 7 else None)


def test_cli_defaults_are_the_settings_defaults():

    params = {p.name: p.default for p in main.commands["probe"].commands["train"].params}
    names = {"warmup": "warmup_epochs"}
    for name in ("kind", "epochs", "batch_size", "lr", "weight_decay", "warmup", "seed"):
        assert params[name] == getattr(Settings(), names.get(name, name)), name


def test_numpy_numbers_in_the_settings_are_written_as_numbers(heads, model_dir, data, tmp_path):
    """A sweep over np.arange(...) seeds trained, then failed writing config.json (numpy's
    int64 is not JSON): nothing was saved."""
    settings = Settings(kind="linear", epochs=np.int64(2), batch_size=np.int32(16),
                        lr=np.float32(1e-3), seed=np.uint64(3))  # fmt: skip
    res = train(model_dir, data, tmp_path / "h", settings=settings, log=lambda _: None)
    config = json.loads((res.out / "config.json").read_text())["training"]
    assert (config["epochs"], config["batch_size"], config["seed"]) == (2, 16, 3)
    assert config["lr"] == pytest.approx(1e-3) and len(res.history) == 2


def numpy_head(folder: Path, tokens: np.ndarray) -> np.ndarray:
    """The saved head applied to (B, N, D) tokens, written out in numpy (float64)."""
    w = {
        k: np.array(v, dtype=np.float64)
        for k, v in mx.load(str(folder / "head.safetensors")).items()
    }
    x = (tokens - w["bn.running_mean"]) / np.sqrt(w["bn.running_var"] + 1e-6)
    if "k.weight" not in w:  # linear: mean token, then W x + b
        return x.mean(axis=1) @ w["linear.weight"].T + w["linear.bias"]
    B, N, D = x.shape
    H = 4
    k = (x @ w["k.weight"].T).reshape(B, N, H, D // H)
    v = (x @ w["v.weight"].T).reshape(B, N, H, D // H)
    q = w["cls_token"].reshape(H, D // H)
    scores = np.einsum("hd,bnhd->bhn", q, k) / np.sqrt(D // H)
    attn = np.exp(scores - scores.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    pooled = np.einsum("bhn,bnhd->bhd", attn, v).reshape(B, D)
    return pooled @ w["linear.weight"].T


@pytest.mark.parametrize("kind", ["attention", "linear"])
def test_head_folder_round_trip(heads, model_dir, data, kind):
    folder = heads[kind].out
    model = aim_mlx.load(model_dir, head=folder)
    assert model.trained_head.classes == tuple(sorted(COLOURS))
    assert model.args.num_classes == 5
    x = mx.array(np.stack([aim_mlx.preprocess(p) for p in sorted(data.glob("*/00[0-2].png"))]))
    trunk = aim_mlx.load(model_dir)
    tokens = np.array(trunk.head_input(trunk.extract_features(x)), dtype=np.float64)
    expected = numpy_head(folder, tokens)
    got = np.array(model(x))
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()
    with pytest.raises(OptionError, match="a trained head .5 classes of its own.*probe eval"):
        evaluate(model, data)  # ImageNet accuracy: not what its classes are


@pytest.mark.parametrize("kind", ["attention", "linear"])
def test_loading_a_head_leaves_the_random_key_as_it_was(heads, model_dir, kind):
    """The new head's random initial weights, replaced by the trained ones, split MLX's global
    key lazily: a seeded program drew other numbers after, and the chain, never computed, grew
    with every head loaded."""
    mx.random.seed(11)
    expected = np.array(mx.random.uniform(shape=(4,)))
    mx.random.seed(11)
    aim_mlx.load(model_dir, head=heads[kind].out)
    assert pending_operations(mx.random.state[0]) == 0
    np.testing.assert_array_equal(np.array(mx.random.uniform(shape=(4,))), expected)


def test_probe_layers_last(model_dir, data, tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    res = train(model_dir, data, tmp_path / "h", probe_layers="last",
                settings=Settings(kind="linear", epochs=2), log=lambda _: None)  # fmt: skip
    assert json.loads((res.out / "config.json").read_text())["probe_layers"] == [2, 3, 4, 5, 6, 7]
    assert res.extracted == 100  # other layers: another feature set
    assert aim_mlx.load(model_dir, head=res.out).args.probe_layers == (2, 3, 4, 5, 6, 7)
    # the head averages its layers: the same blocks in another order are the same features
    again = train(model_dir, data, tmp_path / "h2", probe_layers="7,2,6,3,5,4",
                  settings=Settings(kind="linear", epochs=2), log=lambda _: None)  # fmt: skip
    assert again.extracted == 0
    assert json.loads((again.out / "config.json").read_text())["probe_layers"] == [7, 2, 6, 3, 5, 4]
    assert len(os.listdir(tmp_path / "cache" / "features")) == 1


# ---------------------------------------------------------------------------------------------
# using the head: classify, probe eval, Core ML


def test_classify_and_probe_eval_agree(heads, model_dir, data, tmp_path):
    head = heads["attention"].out
    res = cli("classify", data, "-m", model_dir, "--head", head, "-k", "10", "--json",
              "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(rows) == 100
    classes = sorted(COLOURS)
    for row in rows:
        assert len(row["top_k"]) == 5  # -k 10 clamped to the 5 classes
        assert {t["label"] for t in row["top_k"]} == set(classes)
        assert all(classes[t["index"]] == t["label"] for t in row["top_k"])
        assert abs(sum(t["prob"] for t in row["top_k"]) - 1) < 1e-6
    right = [Path(r["path"]).parent.name == r["top_k"][0]["label"] for r in rows]

    picture = tmp_path / "confusion.png"
    res = cli("probe", "eval", data, "-m", model_dir, "--head", head, "--json",
              "--confusion", picture)  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["top1"] == pytest.approx(100 * np.mean(right))
    assert out["top5"] is None and out["images"] == 100 and out["classes"] == 5  # always 100
    for name in classes:
        mine = [ok for r, ok in zip(rows, right, strict=True) if f"/{name}/" in r["path"]]
        assert out["per_class"][name] == {"images": 20, "top1": pytest.approx(100 * np.mean(mine))}
    assert np.array(out["confusion"]).sum() == 100
    with Image.open(picture) as img:
        assert img.format == "PNG" and min(img.size) > 200
    # the picture is not overwritten without --force; a non-PNG name is a usage error
    res = cli("probe", "eval", data, "-m", model_dir, "--head", head, "--confusion", picture)
    assert res.exit_code == 1 and "--force" in res.output
    res = cli("probe", "eval", data, "-m", model_dir, "--head", head, "--confusion", "c.jpg")
    assert res.exit_code == 2 and ".png" in res.output
    nested = tmp_path / "new" / "folder" / "c.png"  # missing folders are made, as for -o
    res = cli("probe", "eval", data, "-m", model_dir, "--head", head, "--confusion", nested)
    assert res.exit_code == 0, res.output
    assert [p.name for p in nested.parent.iterdir()] == ["c.png"]  # no temporary file left
    per_class = [f"  {out['per_class'][n]['top1']:6.2f}%  {n}  (20 images)" for n in classes]
    top1 = f"top-1 {out['top1']:.2f}%  (100 images, 5 classes)"  # no top-5 with 5 classes
    assert res.stdout.splitlines() == [top1, *per_class]


@pytest.mark.parametrize("kind", ["attention", "linear"])
def test_core_ml_export_agrees_with_mlx(heads, model_dir, data, tmp_path, kind):
    coreml = pytest.importorskip("aim_mlx.export.coreml")
    try:
        coreml.require_coremltools()
    except coreml.ExportError:
        pytest.skip("coremltools is not installed")
    import mil_numpy

    out = tmp_path / "Colours.mlpackage"
    res = cli("export", "coreml", "-m", model_dir, "--head", heads[kind].out, "--out", out,
              "--precision", "float32")  # fmt: skip
    assert res.exit_code == 0, res.output
    model = aim_mlx.load(model_dir, head=heads[kind].out)
    paths = sorted(data.glob("*/001.png"))
    x = np.stack([aim_mlx.preprocess(p) for p in paths])
    ref = np.array(mx.softmax(model(mx.array(x)), axis=-1))
    mean = np.array(coreml.IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = np.array(coreml.IMAGENET_STD).reshape(1, 3, 1, 1)
    pixels = (x * std + mean) * 255  # the preprocessed images as Core ML receives them
    prog, spec = mil_numpy.load_program(out)
    classes = sorted(COLOURS)
    for p, r in zip(pixels, ref, strict=True):
        got = mil_numpy.evaluate(prog, {"image": p[None].astype(np.float32)})
        probs = np.array([got["classLabel_probs"][c] for c in classes])
        assert np.abs(probs - r).max() < 1e-5
        assert got["classLabel"] == classes[int(r.argmax())]
    meta = spec.description.metadata.userDefined
    assert meta["aim_mlx.head_kind"] == kind
    assert meta["aim_mlx.head_trunk_sha256"] == sha256(REF / "backbone.pth")


# ---------------------------------------------------------------------------------------------
# mistakes: clear errors before any work


@pytest.fixture
def no_trunk(monkeypatch):
    """Fail the test if the trunk is loaded (that is, if work starts)."""

    def refuse(*a, **k):
        raise AssertionError("the trunk was loaded")

    monkeypatch.setattr(head_lib, "load_trunk", refuse)


def make_classes(root: Path, data: Path, names: list[str]) -> Path:
    for name in names:
        shutil.copytree(data / name, root / name)
    return root


def test_bad_folders_are_refused_before_any_work(data, model_dir, tmp_path, no_trunk):
    out = tmp_path / "head"
    one = make_classes(tmp_path / "one", data, ["red"])
    with pytest.raises(ProbeError, match="single class"):
        train(model_dir, one, out)
    empty = make_classes(tmp_path / "empty", data, ["red", "blue"])
    (empty / "green").mkdir()
    (empty / "green" / "notes.png").write_text("not an image")
    with pytest.raises(ProbeError, match="'green' hold no usable image"):
        train(model_dir, empty, out)
    latin1 = make_classes(tmp_path / "latin1", data, ["red", "blue"])  # a folder name's bytes
    (latin1 / "blue").rename(latin1 / os.fsdecode(b"bl\xe9"))  # that are not UTF-8
    with pytest.raises(ProbeError, match=r"class folder name 'bl\\udce9' is not UTF-8 text"):
        train(model_dir, latin1, out)  # was a head Core ML export failed on with a traceback
    val = make_classes(tmp_path / "val", data, ["red", "green"])
    with pytest.raises(ProbeError, match=r"only in training: \['blue'\].*validation: none"):
        train(model_dir, make_classes(tmp_path / "t", data, ["red", "blue", "green"]), out,
              val_dir=val)  # fmt: skip
    assert not out.exists()
    # the command line: one clean line, exit 1 (usage errors 2), nothing written
    res = cli("probe", "train", one, "-m", model_dir, "-o", out)
    assert "single class" in exited_cleanly(res, 1).output
    res = cli("probe", "train", data, "-m", model_dir, "-o", out, "--val", val, "--val-split", 0.3)
    assert res.exit_code == 2
    res = cli("probe", "train", data, "-m", model_dir, "-o", out, "--kind", "mlp")
    assert res.exit_code == 2
    existing = tmp_path / "existing"
    existing.mkdir()
    res = cli("probe", "train", data, "-m", model_dir, "-o", existing)
    assert res.exit_code == 1 and "--force" in res.output
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    res = cli("probe", "train", data, "-m", model_dir, "-o", a_file / "head")
    assert res.exit_code == 1 and f"cannot create the folder {a_file}" in res.output
    assert not out.exists()


def test_validation_images_that_are_training_images_are_refused(data, model_dir, tmp_path,
                                                                 no_trunk):  # fmt: skip
    """--val naming the training folder itself, or a folder linking to its images: the best
    epoch would be chosen on training images. Refused before any work, naming the overlap."""
    out = tmp_path / "head"
    root = make_classes(tmp_path / "d", data, ["red", "blue"])
    linked, hard = tmp_path / "linked", tmp_path / "hard"  # a copy made with cp -al, say
    for name in ("red", "blue"):
        (linked / name).mkdir(parents=True)
        (hard / name).mkdir(parents=True)
        first = sorted((root / name).iterdir())[0]
        (linked / name / "x.png").symlink_to(first)
        os.link(first, hard / name / "x.png")
    for val, shared in ((root, 40), (linked, 2), (hard, 2)):
        res = cli("probe", "train", root, "-m", model_dir, "-o", out, "--val", val)
        exited_cleanly(res, 1)
        assert f"{shared} image(s) of the validation folder {val} are training images" in res.output
    assert not out.exists()


def test_validation_copies_of_training_images_are_left_out(data, model_dir, tmp_path):
    """Copies (the same bytes under another name, not a link) are found by the content hash
    that keys the feature cache: validating on them picked the best epoch on training images,
    and every copy scored."""
    root = make_classes(tmp_path / "d", data, ["red", "blue"])
    val = make_classes(tmp_path / "val", data, ["red", "blue"])  # all 40: copies
    with pytest.raises(ProbeError, match="every validation image is a copy of a training image"):
        train(model_dir, root, tmp_path / "h0", val_dir=val, log=lambda _: None,
              settings=Settings(kind="linear", epochs=1))  # fmt: skip
    for name in ("red", "blue"):  # keep one copy and three others of each class
        for i, p in enumerate(sorted((val / name).iterdir())):
            if i >= 4:
                p.unlink()
            elif i:
                p.write_bytes((data / "green" / p.name).read_bytes())  # not a training image
    res = cli("probe", "train", root, "-m", model_dir, "-o", tmp_path / "h", "--val", val,
              "--epochs", "1", "--kind", "linear")  # fmt: skip
    assert res.exit_code == 0, res.output
    for name in ("red", "blue"):
        copy, original = val / name / "000.png", root / name / "000.png"
        assert f"error: {copy}: left out of validation: a copy of {original}" in res.stderr
    config = json.loads((tmp_path / "h" / "config.json").read_text())["training"]
    assert (config["train_images"], config["val_images"]) == (40, 6)
    # a split: copies whose original went to training are left out of validation too
    for p in sorted((root / "red").iterdir()):
        (root / "red" / f"copy-{p.name}").write_bytes(p.read_bytes())
    res = train(model_dir, root, tmp_path / "h2", val_split=0.5, log=lambda _: None,
                settings=Settings(kind="linear", epochs=1))  # fmt: skip
    copies = [e for e in res.errors if "left out of validation" in e[1]]
    assert copies and res.train_images + res.val_images + len(copies) == 60
    for path, reason in copies:  # each names the training image it repeats
        assert Path(path).read_bytes() == Path(reason.split()[-1]).read_bytes()


def test_options_the_split_cannot_satisfy_are_refused_before_any_work(
    data, model_dir, tmp_path, no_trunk
):
    one_each = tmp_path / "one-each"
    for name in ("red", "blue"):
        (one_each / name).mkdir(parents=True)
        shutil.copy(data / name / "000.png", one_each / name)
    with pytest.raises(ProbeError, match="leaves no image: every class has a single image.*--val"):
        train(model_dir, one_each, tmp_path / "h")
    blocks = json.loads((model_dir / "config.json").read_text())["num_blocks"]
    with pytest.raises(ProbeError, match=rf"\[{blocks + 90}\] are outside blocks 0..{blocks - 1}"):
        train(model_dir, data, tmp_path / "h", probe_layers=f"0,{blocks + 90}")
    res = cli("probe", "train", data, "-m", model_dir, "-o", tmp_path / "h", "--probe-layers", "x")
    must = "probe_layers (--probe-layers) must be best, last or block indices"
    assert res.exit_code == 1 and must in res.output


def test_python_settings_are_checked_as_the_cli_options_are(data, model_dir, tmp_path, no_trunk):
    """What the CLI's option ranges refuse, `train` refuses too (a negative learning rate
    trained 30 epochs of a diverging head), and a loaded model is named as the slip it is."""
    out = tmp_path / "h"
    for wrong in (Settings(lr=-1.0), Settings(lr=0.0), Settings(weight_decay=-0.1),
                  Settings(warmup_epochs=-1.0), Settings(lr=float("nan")),
                  Settings(lr=float("inf")), Settings(weight_decay=float("inf")),
                  Settings(warmup_epochs=float("inf")), Settings(lr=10**400),
                  Settings(weight_decay=10**400)):  # fmt: skip
        with pytest.raises(ProbeError, match="lr must be above 0, weight decay and warmup"):
            train(model_dir, data, out, settings=wrong)
    for wrong in ([1.5, 2], [True]):  # were blocks 1 and 2 (1): rounded silently
        with pytest.raises(ProbeError, match="probe layers must be block indices"):
            train(model_dir, data, out, probe_layers=wrong)
    for wrong in (Settings(seed=-1), Settings(seed=2**64), Settings(seed=1.5)):  # tracebacks
        with pytest.raises(ProbeError, match="seed must be a whole number from 0 to 2"):
            train(model_dir, data, out, settings=wrong)
    with pytest.raises(ProbeError, match="epochs and batch size must be whole numbers"):
        train(model_dir, data, out, settings=Settings(epochs=2.5))
    for seed in ("-1", str(2**64)):  # numpy's and MLX's generators take 0..2^64 - 1
        res = cli("probe", "train", data, "-m", model_dir, "-o", out, "--seed", seed)
        assert "--seed" in exited_cleanly(res, 2).output
    with pytest.raises(TypeError, match=r"settings: give aim_mlx.probe.Settings\(...\)"):
        train(model_dir, data, out, settings={"epochs": 1})
    with pytest.raises(TypeError, match="a model name or folder.*not a loaded model"):
        train(aim_mlx.load(model_dir), data, out)
    assert not out.exists()


def test_the_split_of_thousands_of_classes_is_quick():
    """Each class's members were found by a pass over every sample: 3000 classes of 20 images
    took 5 s here, 10,000 of 100 would take an hour."""
    import time

    from aim_mlx.probe.data import Dataset, Sample, stratified_split

    C = 6000
    samples = [Sample(f"{c}/{i}.png", c) for i in range(10) for c in range(C)]  # interleaved
    dataset = Dataset("d", [str(c) for c in range(C)], samples, [])
    start = time.perf_counter()
    train_part, val_part = stratified_split(dataset, 0.2, seed=0)
    assert time.perf_counter() - start < 2.0  # 0.1 s here; was 10 s
    assert np.bincount([s.label for s in val_part]).tolist() == [2] * C
    assert len(train_part) == 8 * C
    assert sorted(s.path for s in train_part + val_part) == sorted(s.path for s in samples)


def test_unreadable_images_are_reported_and_left_out(data, model_dir, tmp_path):
    root = make_classes(tmp_path / "d", data, ["red", "blue"])
    (root / "red" / "empty.png").write_bytes(b"")
    good = (root / "blue" / "000.png").read_bytes()
    (root / "blue" / "truncated.png").write_bytes(good[: len(good) // 2])
    res = cli("probe", "train", root, "-m", model_dir, "-o", tmp_path / "h", "--epochs", "2",
              "--kind", "linear")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"error: {root / 'red' / 'empty.png'}: not an image" in res.stderr
    assert f"error: {root / 'blue' / 'truncated.png'}:" in res.stderr
    assert "training a linear head on" in res.stderr and "2 classes" in res.stderr
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["training"]["train_images"] + config["training"]["val_images"] == 40


def test_training_without_usable_features_says_why(data, model_dir, tmp_path, monkeypatch):
    """Every image's features NaN (damaged weights, or float16 overflowing): the refusal names
    an image and its reason, which the error lines printed after training never reach."""
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))  # not the healthy features
    damaged = nan_weights(model_dir, tmp_path)
    root = make_classes(tmp_path / "d", data, ["red", "blue"])
    res = cli("probe", "train", root, "-m", damaged, "-o", tmp_path / "h", "--no-progress")
    assert res.exit_code == 1 and "no readable training image left" in res.output
    assert f"{root / 'blue' / '000.png'}: the model's output for this image is NaN" in res.output


def test_heic_photos_are_usable_training_images(tmp_path):
    """iPhone photos, the README's example: the header check reads them as decoding does
    (a process that had decoded none yet took every HEIC file for "not an image")."""
    pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif reads HEIC")
    from aim_mlx.probe.data import read_dataset

    photo = Image.open(REF / "images" / "rocket.jpg").convert("RGB")
    for i, name in enumerate(["cat", "dog", "cat", "dog"]):
        (tmp_path / name).mkdir(exist_ok=True)
        heif = pillow_heif.from_pillow(photo.rotate(30 * i))
        heif.save(tmp_path / name / f"{i}.heic")
    dataset = read_dataset(tmp_path)
    assert dataset.skipped == [] and dataset.counts() == [2, 2]


def test_a_link_back_to_the_root_adds_no_other_class_images(data, tmp_path):
    """A link in a class folder back to the dataset's root is a loop, as `classify` sees it;
    it put every other class's images in that class too, labelled as it."""
    from aim_mlx.probe.data import read_dataset
    from aim_mlx.probe.evaluate import labelled_images

    root = make_classes(tmp_path / "d", data, ["red", "blue"])
    (root / "red" / "up").symlink_to(root, target_is_directory=True)
    dataset = read_dataset(root)
    assert dataset.classes == ["blue", "red"] and dataset.counts() == [20, 20]
    assert all(Path(s.path).parent.name == dataset.classes[s.label] for s in dataset.samples)
    pairs = labelled_images(root, ["blue", "red"], "head")
    assert sorted(pairs) == sorted((s.path, s.label) for s in dataset.samples)
    (root / "all").symlink_to(root, target_is_directory=True)  # a class folder that is the root
    with pytest.raises(ProbeError, match="'all' hold no usable image"):
        read_dataset(root)


def test_one_file_in_two_classes_is_refused_before_any_work(data, model_dir, tmp_path, no_trunk):
    """A link or a hard link in one class to another class's image: one image with two labels,
    which the split may train on under one class and validate on under the other."""

    for link in (os.symlink, os.link):
        root = make_classes(tmp_path / link.__name__, data, ["red", "blue"])
        link(root / "red" / "000.png", root / "blue" / "x.png")
        with pytest.raises(ProbeError, match=r"blue/x.png and .*red/000.png are one file .* in two"
                           r" classes, 'blue' and 'red'"):  # fmt: skip
            train(model_dir, root, tmp_path / "head")
        res = cli("probe", "train", data, "-m", model_dir, "-o", tmp_path / "head", "--val", root)
        assert res.exit_code == 1 and "are one file (a link) in two classes" in res.output
    assert not (tmp_path / "head").exists()


def test_a_second_name_of_one_image_is_skipped(data, tmp_path):
    """Two names of one image in one class (a link, a hard link): the split could train on one
    and validate on the other. The second name is skipped, saying which image it is."""
    from aim_mlx.probe.data import file_id, read_dataset, stratified_split

    root = make_classes(tmp_path / "d", data, ["red", "blue"])
    (root / "red" / "fav.png").symlink_to(root / "red" / "000.png")
    os.link(root / "blue" / "001.png", root / "blue" / "zz.png")
    dataset = read_dataset(root)
    assert len(dataset.samples) == 40 and sorted(dataset.skipped) == [
        (str(root / "blue" / "zz.png"), f"the same file as {root / 'blue' / '001.png'}"),
        (str(root / "red" / "fav.png"), f"the same file as {root / 'red' / '000.png'}"),
    ]
    for seed in range(10):
        train_set, val_set = stratified_split(dataset, 0.5, seed)
        assert not {file_id(s.path) for s in train_set} & {file_id(s.path) for s in val_set}


def test_unreadable_sub_folders_are_listed_as_skipped(data, tmp_path, unreadable):
    from aim_mlx.probe.data import read_dataset

    root = make_classes(tmp_path / "d", data, ["red", "blue"])
    (root / "red" / "locked").mkdir()
    dataset = read_dataset(root)
    locked = str(root / "red" / "locked")
    assert dataset.skipped == [(locked, "cannot read the folder: Permission denied")]
    assert dataset.counts() == [20, 20]


def test_probe_eval_reports_unreadable_sub_folders(heads, model_dir, data, tmp_path, unreadable):
    root = make_classes(tmp_path / "d", data, ["red", "blue"])
    (root / "red" / "locked").mkdir()
    head = heads["attention"].out
    res = cli("probe", "eval", root, "-m", model_dir, "--head", head, "--json", "--no-progress")
    assert res.exit_code == 1, res.output  # the other images are evaluated, and it says so
    locked = str(root / "red" / "locked")
    out = json.loads(res.stdout)
    assert out["failed"] == [{"path": locked, "error": "cannot read the folder: Permission denied"}]
    assert out["images"] == 40 and f"error: {locked}: cannot read the folder" in res.stderr


def test_probe_eval_counts_an_image_once_and_refuses_one_in_two_classes(heads, model_dir, data,
                                                                        tmp_path):  # fmt: skip
    """As `aim-mlx eval`: a second name of an image in its class is counted once and named (exit
    1); an image in two classes is refused before the trunk is loaded."""
    root = make_classes(tmp_path / "d", data, ["red", "blue"])
    red = root / "red" / "000.png"
    os.link(red, root / "red" / "zz.png")
    head = heads["attention"].out
    res = cli("probe", "eval", root, "-m", model_dir, "--head", head, "--json", "--no-progress")
    assert res.exit_code == 1, res.output
    out = json.loads(res.stdout)
    assert out["images"] == 40 and out["failed"] == [
        {"path": str(root / "red" / "zz.png"), "error": f"the same file as {red}: counted once"}
    ]
    (root / "blue" / "x.png").symlink_to(red)
    res = cli("probe", "eval", root, "-m", tmp_path / "not-loaded", "--head", head)
    exited_cleanly(res, 1)
    assert res.stderr.splitlines()[-1] == (
        f"Error: evaluation folder {root}: {root / 'blue' / 'x.png'} and {red} are one file (a "
        "link) in two classes, 'blue' and 'red'; keep it in one class"
    )


def test_probe_eval_json_has_evals_keys(heads, model_dir, data, tmp_path):
    # README: `probe eval --json` has `aim-mlx eval --json`'s keys plus per_class and confusion
    imagenet = tmp_path / "imagenet" / "n01440764"
    imagenet.mkdir(parents=True)
    shutil.copy(data / "red" / "000.png", imagenet)
    res = cli("eval", imagenet.parent, "-m", model_dir, "--json", "--no-progress")
    assert res.exit_code == 0, res.output
    eval_keys = set(json.loads(res.stdout))
    res = cli("probe", "eval", make_classes(tmp_path / "d", data, ["red"]), "-m", model_dir,
              "--head", heads["attention"].out, "--json", "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert eval_keys | {"per_class", "confusion"} <= set(out)
    assert out["img_size"] == 224


def test_probe_eval_without_a_readable_image_has_no_accuracy(heads, model_dir, tmp_path):
    # as `aim-mlx eval`: null in --json, "no accuracy" in the text, exit 1; never a 0% top-1
    for name in ("red", "blue"):
        (tmp_path / "d" / name).mkdir(parents=True)
        (tmp_path / "d" / name / "000.png").write_bytes(b"not a picture")
    head = heads["attention"].out
    picture = tmp_path / "c.png"
    res = cli("probe", "eval", tmp_path / "d", "-m", model_dir, "--head", head, "--json",
              "--no-progress", "--confusion", picture)  # fmt: skip
    assert res.exit_code == 1, res.output
    out = json.loads(res.stdout)
    assert out["top1"] is None and out["top5"] is None and out["images"] == 0
    assert len(out["failed"]) == 2 and picture.is_file()
    res = cli("probe", "eval", tmp_path / "d", "-m", model_dir, "--head", head, "--no-progress")
    assert res.exit_code == 1
    assert res.stdout == "no accuracy: no image could be read (see the errors above)\n"


@pytest.mark.parametrize(
    "change, message",
    [
        # Integer weights loaded as they were: every image scored 50/50, exit status 0.
        ("int32", "'{first}' is stored as mlx.core.int32, not float32"),
        ("extra", "Received 1 parameters not in model: zzz."),  # MLX's message, on one line
        # was every image's "output is NaN or Inf ...; convert the checkpoint again"
        ("nan", "'{first}' holds NaN or Inf; train the head again"),
    ],
)
def test_damaged_head_weights_are_refused(heads, model_dir, tmp_path, change, message):
    head = tmp_path / "head"
    shutil.copytree(heads["linear"].out, head)
    weights = mx.load(str(head / "head.safetensors"))
    if change == "int32":
        weights = {k: v.astype(mx.int32) for k, v in weights.items()}
    elif change == "nan":
        weights = {k: v * float("nan") for k, v in weights.items()}
    else:
        weights["zzz"] = mx.zeros(3)
    mx.save_safetensors(str(head / "head.safetensors"), weights)
    message = message.format(first=next(iter(mx.load(str(head / "head.safetensors")))))
    res = cli("classify", REF / "images" / "rocket.jpg", "-m", model_dir, "--head", head)
    assert res.exit_code == 1 and res.stdout == ""
    assert res.stderr == (
        f"Error: {head}/head.safetensors: cannot load the head's weights ({message})\n"
    )


def test_head_with_another_trunk_is_refused(heads, tmp_path):
    # the same architecture from other source weights (the hub-style file): another trunk
    other = convert(tmp_path / "other", hf_path=REF / "hf_repo", progress=False, name="other")
    head = heads["attention"].out
    with pytest.raises(ProbeError) as e:
        aim_mlx.load(other, head=head)
    message = str(e.value)
    assert "aim-tiny" in message and "other" in message
    assert sha256(REF / "backbone.pth")[:12] in message
    assert sha256(REF / "hf_repo" / "pytorch_model.bin")[:12] in message
    res = cli("classify", REF / "images", "-m", other, "--head", head)
    assert res.exit_code == 1 and "was trained on the trunk aim-tiny" in res.output


def test_the_trunk_is_the_files_that_hold_it_whatever_their_names(model_dir, tmp_path):
    """A backbone named *head* and a head file without "head" in its name: the trunk a head is
    tied to (and its features keyed by) is still the backbone's SHA-256 alone; a folder
    converted before the converter recorded it is read by the file names, as then."""
    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(REF / "backbone.pth", odd / "my_head_trunk.pth")
    shutil.copy(REF / "head_best_layers.pth", odd / "probe.pth")
    out = convert(tmp_path / "m", backbone=odd / "my_head_trunk.pth", head=odd / "probe.pth",
                  num_heads=4, probe_layers="1,2,3,4,5,6", progress=False)  # fmt: skip
    backbone = sha256(REF / "backbone.pth")
    assert feature_cache.trunk_info(out).sha256 == backbone
    assert feature_cache.trunk_info(model_dir).sha256 == backbone
    older = tmp_path / "older"  # its sources without "trunk": the official names tell
    shutil.copytree(model_dir, older)
    config = json.loads((older / "config.json").read_text())
    config["sources"] = [{k: v for k, v in s.items() if k != "trunk"} for s in config["sources"]]
    (older / "config.json").write_text(json.dumps(config))
    assert feature_cache.trunk_info(older).sha256 == backbone


def test_features_of_another_set_format_are_not_reused(model_dir, data, tmp_path, monkeypatch):
    """The feature-set format is in the set's key: a version whose images give other features
    (it bumps SET_FORMAT) extracts them again instead of reading the old ones as its own."""
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    root = make_classes(tmp_path / "d", data, ["red", "blue"])
    settings = Settings(kind="linear", epochs=1)
    first = train(model_dir, root, tmp_path / "h1", settings=settings, log=lambda _: None)
    again = train(model_dir, root, tmp_path / "h2", settings=settings, log=lambda _: None)
    monkeypatch.setattr(feature_cache, "SET_FORMAT", feature_cache.SET_FORMAT + 1)
    newer = train(model_dir, root, tmp_path / "h3", settings=settings, log=lambda _: None)
    assert (first.extracted, again.extracted, newer.extracted) == (40, 0, 40)


def test_the_same_weights_with_other_heads_are_another_trunk(model_dir, data, tmp_path,
                                                             monkeypatch):  # fmt: skip
    """The number of attention heads is not in the weights (`convert --num-heads`): a backbone
    converted again with another one took the first conversion's cached features, and its
    trained heads, as its own."""
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    probe_layers = json.loads((model_dir / "config.json").read_text())["probe_layers"]
    eight = convert(tmp_path / "eight", backbone=REF / "backbone.pth", head=REF /
                    "head_best_layers.pth", num_heads=8, probe_layers=probe_layers,
                    name="aim-tiny", progress=False)  # fmt: skip
    root = make_classes(tmp_path / "d", data, ["red", "blue"])
    settings = Settings(kind="linear", epochs=1)
    four = train(model_dir, root, tmp_path / "h4", settings=settings, log=lambda _: None)
    res = train(eight, root, tmp_path / "h8", settings=settings, log=lambda _: None)
    assert (four.extracted, res.extracted) == (40, 40)  # not the 4-head trunk's features
    with pytest.raises(ProbeError, match=r"trained on the trunk aim-tiny .*4 heads\), not on "
                       r"aim-tiny .*8 heads\)"):  # fmt: skip
        aim_mlx.load(eight, head=four.out)


def test_head_keywords_win_over_folders(heads, model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(heads["linear"].out, tmp_path / "best")
    assert aim_mlx.load(model_dir, head="best").args.num_classes == 1000
    assert aim_mlx.load(model_dir, head="./best").args.num_classes == 5
    res = cli("classify", REF / "images" / "rocket.jpg", "-m", model_dir, "--head", "nowhere")
    must = "head (--head) must be best, last or a trained head's folder, got 'nowhere'"
    assert res.exit_code == 2 and must in res.output
    res = cli("classify", REF / "images" / "rocket.jpg", "-m", model_dir, "--head", tmp_path)
    assert res.exit_code == 1 and "no config.json" in res.output


# ---------------------------------------------------------------------------------------------
# the feature cache


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_extraction_resumes(data, model_dir, tmp_path, monkeypatch, signum):
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    write = feature_cache.FeatureSet.write
    calls = []

    def interrupted_after_7(self, key, array):
        if len(calls) == 7:
            signal.raise_signal(signum)
        calls.append(key)
        write(self, key, array)

    monkeypatch.setattr(feature_cache.FeatureSet, "write", interrupted_after_7)
    res = cli("probe", "train", data, "-m", model_dir, "-o", tmp_path / "h", "--no-progress")
    assert res.exit_code == 128 + signum and not (tmp_path / "h").exists()
    assert "extracted features stay cached, the next run resumes" in res.stderr
    (folder,) = (tmp_path / "cache" / "features").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{k}.npy" for k in calls] + ["info.json"]
    )  # fmt: skip
    monkeypatch.setattr(feature_cache.FeatureSet, "write", write)
    result = train(model_dir, data, tmp_path / "h", settings=Settings(epochs=2),
                   log=lambda _: None)  # fmt: skip
    assert result.extracted == 100 - 7
    # the cached features are the trunk's head input, in float16
    trunk = aim_mlx.load(model_dir)
    path = sorted(data.glob("red/*.png"))[0]
    tokens = trunk.head_input(trunk.extract_features(mx.array(aim_mlx.preprocess(path)[None])))
    cached = np.load(folder / f"{sha256(path)}.npy")
    assert cached.dtype == np.float16 and cached.shape == (256, 64)
    np.testing.assert_allclose(cached, np.array(tokens[0]), rtol=2e-3, atol=1e-3)


def test_what_killed_runs_left_is_cleared_by_the_next(heads, model_dir, data, tmp_path, workdir):
    """A SIGKILL leaves the temporary head folder and a feature file's temporary name behind
    (PID 999999999: no such process); the next run removes them, not those of live processes."""
    out = tmp_path / "h"
    shutil.copytree(heads["linear"].out, out)
    (tmp_path / ".h.partial-999999999-deadbeef").mkdir()
    (tmp_path / ".h.partial-999999999-deadbeef" / "head.safetensors").write_bytes(b"half")
    (folder,) = (workdir / "cache" / "features").iterdir()
    dead = folder / f".{'0' * 64}.npy.partial-999999999-deadbeef"
    live = folder / f".{'1' * 64}.npy.partial-{os.getpid()}-deadbeef"
    dead.write_bytes(b"half")
    live.write_bytes(b"being written")
    try:
        res = cli("probe", "train", data, "-m", model_dir, "-o", out, "--force",
                  "--kind", "linear", "--epochs", "1", "--no-progress")  # fmt: skip
        assert res.exit_code == 0, res.output
        assert [p.name for p in tmp_path.iterdir()] == ["h"]
        assert not dead.exists() and live.exists()
    finally:
        live.unlink()


def test_a_folder_made_while_training_is_kept(heads, model_dir, data, tmp_path, monkeypatch):
    """Without --force, an (empty) folder made by another process after the output was checked
    (here just before the head is renamed into place) is kept, not silently replaced."""
    out = tmp_path / "h"
    made = appears_before_publish(monkeypatch, out, lambda folder: folder.mkdir())
    res = cli("probe", "train", data, "-m", model_dir, "-o", out,
              "--kind", "linear", "--epochs", "1", "--no-progress")  # fmt: skip
    exited_cleanly(res, 1)
    assert made == [out]
    assert res.stderr.splitlines()[-1] == (
        f"Error: {out} appeared while this command ran (another process?) and is kept; choose "
        "another output, or pass --force to replace it"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["h"] and list(out.iterdir()) == []


def test_a_head_another_run_wrote_while_training_is_kept(heads, model_dir, data, tmp_path,
                                                         monkeypatch):  # fmt: skip
    """Two runs to one -o: the one that finishes second finds the other's head there, made
    after it checked -o, and says so (not "already exists", which it was not at the start)."""
    from aim_mlx.probe import training

    out = tmp_path / "h"
    fit = training.fit

    def other_run_finishes_first(*args, **kwargs):
        shutil.copytree(heads["linear"].out, out)
        return fit(*args, **kwargs)

    monkeypatch.setattr(training, "fit", other_run_finishes_first)
    res = cli("probe", "train", data, "-m", model_dir, "-o", out,
              "--kind", "linear", "--epochs", "1", "--no-progress")  # fmt: skip
    exited_cleanly(res, 1)
    assert res.stderr.splitlines()[-1] == (
        f"Error: {out} appeared while this command ran (another process?) and is kept; choose "
        "another output, or pass --force to replace it"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["h"]  # no temporary folder left
    assert (out / "head.safetensors").read_bytes() == \
        (heads["linear"].out / "head.safetensors").read_bytes()  # fmt: skip


def test_a_confusion_picture_made_while_evaluating_is_kept(heads, model_dir, data, tmp_path,
                                                           monkeypatch):  # fmt: skip
    """Without --force, a --confusion file made by another process after it was checked (here
    just before the picture is moved into place) is kept, as for -o: one error line."""
    picture = tmp_path / "c.png"
    made = appears_before_publish(monkeypatch, picture, lambda p: p.write_text("theirs"))
    res = cli("probe", "eval", data, "-m", model_dir, "--head", heads["linear"].out,
              "--confusion", picture, "--no-progress")  # fmt: skip
    exited_cleanly(res, 1)
    assert made == [picture]
    assert res.stderr.splitlines()[-1] == (
        f"Error: {picture} appeared while this command ran (another process?) and is kept; "
        "choose another output, or pass --force to replace it"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]  # no temporary file left
    assert picture.read_text() == "theirs"


def test_cache_lists_and_removes_feature_sets(heads, workdir):
    res = cli("cache")
    assert res.exit_code == 0, res.output
    (key,) = [p.name for p in (workdir / "cache" / "features").iterdir()]
    assert key in res.output and "100 images" in res.output
    res = cli("cache", "rm", key)
    assert res.exit_code == 0 and f"removed features {key}" in res.output
    assert not (workdir / "cache" / "features" / key).exists()


def test_confusion_picture_fits_its_title():
    from PIL import ImageDraw

    from aim_mlx.probe.evaluate import HeadEvalResult, _font, confusion_image

    result = HeadEvalResult(50.0, None, 2, 2, ["a", "b"], np.array([[1, 0], [1, 0]]))
    title = "my-head: top-1 50.0% on 2 images of /a/rather/long/path/to/the/held-out/images"
    picture = confusion_image(result, title)
    needed = ImageDraw.Draw(picture).textbbox((10, 8), title, font=_font(16))[2]
    assert picture.width >= needed + 10


def test_a_confusion_picture_of_hundreds_of_classes_stays_a_picture():
    """Its cells were 28 px whatever the number of classes: 1000 classes took 3.4 GB and 27 s
    (after the whole evaluation, before the results were printed); a few thousand, more memory
    than the machine's."""
    from aim_mlx.probe.evaluate import HeadEvalResult, confusion_image

    C, side = 400, 8192  # the matrix's side at most
    confusion = np.eye(C, dtype=np.int64) * 3
    confusion[5, 7] = 3  # class 5: half right, half taken for class 7
    result = HeadEvalResult(50.0, None, 3 * C + 3, C, [f"class {i}" for i in range(C)], confusion)
    picture = np.array(confusion_image(result))
    assert max(picture.shape[:2]) < side + 400  # the names and the title beside it
    cell = side // C

    def where(colour):  # the pixels of one colour: (rows, columns)
        return np.nonzero((picture == colour).all(axis=-1))

    red_rows, red_cols = where((255, 127, 127))  # cell (5, 7): half of row 5
    blue_rows, blue_cols = where((127, 127, 255))  # cell (5, 5): the other half
    assert len(red_rows) >= (cell - 1) ** 2 and len(blue_rows) >= (cell - 1) ** 2
    assert red_rows.min() == blue_rows.min() and red_cols.min() - blue_cols.min() == 2 * cell


def test_the_log_reads_well(data, model_dir, tmp_path):
    root = make_classes(tmp_path / "d", data, ["red", "blue"])
    res = cli("probe", "train", root, "-m", model_dir, "-o", tmp_path / "h", "--epochs", "1")
    assert res.exit_code == 0, res.output
    assert "training an attention head on 32 images (2 classes), validating on 8" in res.stderr
    assert "(32 training, 8 validation images, 2 classes; " in res.stderr


def test_the_readmes_python_examples_run_as_written(heads, model_dir, data, tmp_path, monkeypatch):
    """The README's Python blocks, run in order with the tiny model, its images and a trained
    head in place of aim-600M, photos and my-head: what their comments say holds."""
    import importlib.util
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)  # where the embed, eval and Core ML examples write their files
    wnid = tmp_path / "imagenet" / "val" / "n01440764"  # the eval examples' folders, there
    wnid.mkdir(parents=True)
    shutil.copy(REF / "images" / "rocket.jpg", wnid)
    make_classes(tmp_path / "held-out", data, ["green", "red"])
    photo, photos, new_image = REF / "images" / "rocket.jpg", REF / "images", data / "green"
    new_image = sorted(new_image.iterdir())[0]
    places = {
        '"aim-600M"': model_dir,
        '"photo.jpg"': photo,
        '"photos/"': photos,
        '"my-head"': heads["linear"].out,
        '"new.jpg"': new_image,
    }
    scope, results = {}, []
    coremltools = importlib.util.find_spec("coremltools") is not None
    for block in blocks:
        for name, path in places.items():
            block = block.replace(name, repr(str(path)))
        if coremltools or "coreml" not in block:  # the Core ML example needs coremltools
            exec(compile(block, "README.md", "exec"), scope)
        results.append(dict(scope))

    first, embedded, evaluated, second, exported = results
    assert embedded["emb"].features.shape == (4, 64) and embedded["result"].shape == (4, 64)
    assert embedded["result"].files == [Path("feats.npy"), Path("feats.npy.paths.txt")]
    np.testing.assert_array_equal(np.load(tmp_path / "feats.npy"), embedded["emb"].features)
    if coremltools:
        assert exported["result"].path == (tmp_path / "AIM600M.mlpackage").resolve()
        assert (tmp_path / "m.mlpackage" / "Manifest.json").is_file()
    assert first["x"].dtype == np.float32 and first["x"].shape == (3, 224, 224)
    assert first["logits"].dtype == mx.float32 and first["logits"].shape == (1, 1000)
    assert len(first["features"]) == 1 + 6  # blocks 0..6: 6 is the best head's last probe layer
    res = cli("classify", photo, photos, "-m", model_dir, "--json", "--no-progress")
    assert res.exit_code == 0, res.output
    printed = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["path"], r["top_k"][0]["index"]) for r in first["rows"]] == [
        (r["path"], r["top_k"][0]["index"]) for r in printed
    ]  # the rows `--json` prints
    (row,) = second["rows"]
    labels = [t["label"] for t in row["top_k"]]
    assert row["path"] == str(new_image) and len(labels) == 3 and set(labels) <= set(COLOURS)
    assert labels[0] == "green"  # the class names of the head, which learnt them
    evaluation = evaluated["evaluation"]
    assert evaluation.result.images == 1 and evaluation.result.failed == []
    res = cli("eval", "imagenet/val", "-m", model_dir, "--limit", "5000", "--json")
    assert res.exit_code == 0, res.output
    assert evaluation.to_dict() == json.loads(res.stdout)  # what `--json` prints
    evaluation = second["evaluation"]
    assert evaluation.result.images == 40 and (tmp_path / "confusion.png").is_file()
    per_class = evaluation.result.per_class()
    assert [name for name, row in per_class.items() if row["images"]] == ["green", "red"]
    res = cli("probe", "eval", "held-out/", "-m", model_dir, "--head", heads["linear"].out,
              "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert evaluation.to_dict() == json.loads(res.stdout)


def test_images_in_no_class_folder_are_named_not_dropped_silently(data, tmp_path, heads,
                                                                  model_dir):  # fmt: skip
    from aim_mlx.images import LOOSE
    from aim_mlx.probe.data import read_dataset

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        shutil.copy(data / "red" / "000.png", flat / f"{i}.png")
    with pytest.raises(ProbeError, match="no class sub-folders; its 3 images lie directly in it"):
        read_dataset(flat)

    root = make_classes(tmp_path / "d", data, ["red", "blue"])
    shutil.copy(data / "red" / "000.png", root / "stray.png")
    (root / "notes.txt").write_text("not an image, not reported")
    dataset = read_dataset(root)
    assert dataset.skipped == [(str(root / "stray.png"), LOOSE)] and dataset.counts() == [20, 20]
    res = cli("probe", "eval", root, "-m", model_dir, "--head", heads["attention"].out, "--json",
              "--no-progress")  # fmt: skip
    out = json.loads(res.stdout)
    assert res.exit_code == 1 and out["images"] == 40, res.output
    assert out["failed"] == [{"path": str(root / "stray.png"), "error": LOOSE}]


def test_class_names_match_in_either_unicode_form(data, tmp_path):
    """A folder named on macOS (often NFD) and the same name typed on Linux (NFC) are one class."""
    from aim_mlx.probe.data import check_same_classes, read_dataset
    from aim_mlx.probe.evaluate import labelled_images

    nfd, nfc = "cafe\u0301", "caf\u00e9"
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    for root, name in ((train_dir, nfd), (val_dir, nfc)):
        shutil.copytree(data / "red", root / name)
        shutil.copytree(data / "blue", root / "tea")
    train, val = read_dataset(train_dir), read_dataset(val_dir)
    assert train.classes == val.classes == [nfc, "tea"]
    check_same_classes(train, val)
    assert {Path(s.path).parent.name for s in train.samples if s.label == 0} == {nfd}
    for labels in ([nfd, "tea"], [nfc, "tea"]):  # a head trained before names were NFC, or after
        pairs = labelled_images(val_dir, labels, "head")
        assert {label for p, label in pairs if Path(p).parent.name == nfc} == {0}
        assert len(pairs) == 40
    with pytest.raises(ProbeError, match=f"head has classes '{nfd}' and '{nfc}', the same name"):
        labelled_images(val_dir, [nfd, "tea", nfc], "head")  # an old head with both: not merged

    if not (train_dir / nfc).exists():  # (macOS's file systems: one folder, either form)
        shutil.copytree(data / "green", train_dir / nfc)  # both forms side by side: refused
        with pytest.raises(ProbeError, match="the same name in two Unicode forms"):
            read_dataset(train_dir)
