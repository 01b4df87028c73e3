"""classify / embed / eval on the fixture model: rankings, outputs, and per-file errors."""

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURE_CONFIG, REF, nan_weights
from PIL import Image
from test_preprocess import png_header

import aim_mlx
from aim_mlx import images
from aim_mlx.cli import main
from aim_mlx.labels import imagenet_classes
from aim_mlx.transforms import ImageError

# classify / embed / eval machinery, checked against float32 reference values at CPU bounds:
# MLX's default device (a GPU where there is one, with float16 by default) is pinned to the CPU.
pytestmark = pytest.mark.usefixtures("pin_cpu", "private_cache")

LOGITS = np.load(REF / "logits_images_best.npz")
PROBE = FIXTURE_CONFIG["variants"]["best"]["probe_layers"]


@pytest.fixture(scope="module")
def model(model_dir):
    return aim_mlx.load(model_dir)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def expected_top(name: str, k: int = 5) -> list[int]:
    return np.argsort(-LOGITS[name])[:k].tolist()


def test_python_api_ranks_like_the_reference(model):
    rows = aim_mlx.classify(model, [REF / "images"], k=5, batch_size=3)
    assert [Path(r["path"]).name for r in rows] == sorted(LOGITS.files)
    for row in rows:
        name = Path(row["path"]).name
        assert [t["index"] for t in row["top_k"]] == expected_top(name)
        logits = LOGITS[name].astype(np.float64)
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose(
            [t["prob"] for t in row["top_k"]], probs[expected_top(name)], rtol=1e-4
        )
        assert row["top_k"][0]["label"] == imagenet_classes()[expected_top(name)[0]].name


def test_json_output_and_paths_as_given(model_dir):
    folder = str(REF / "images")
    result = cli("classify", folder, REF / "images" / "rocket.jpg", "--model", model_dir,
                 "--json", "--dtype", "float32", "-k", "3", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in rows] == [
        *(f"{folder}/{n}" for n in sorted(LOGITS.files)),
        str(REF / "images" / "rocket.jpg"),
    ]
    for row in rows:
        assert set(row) == {"path", "top_k"} and len(row["top_k"]) == 3
        assert [t["index"] for t in row["top_k"]] == expected_top(Path(row["path"]).name, 3)
        assert set(row["top_k"][0]) == {"index", "label", "prob"}


def test_csv_output(model_dir):
    result = cli("classify", REF / "images" / "chelsea.png", "--model", model_dir, "--csv")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["path", "rank", "index", "label", "prob", "error"]
    assert [int(r[2]) for r in rows[1:]] == expected_top("chelsea.png")
    assert [r[1] for r in rows[1:]] == ["1", "2", "3", "4", "5"]
    assert {r[5] for r in rows[1:]} == {""}
    assert rows[1][3] == imagenet_classes()[expected_top("chelsea.png")[0]].name  # commas quoted
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert re.search(r"--csv +# (\S+)", readme).group(1) == ",".join(rows[0])  # its columns


def bad_and_odd_images(folder: Path) -> dict[str, str | None]:
    """Files -> expected error fragment (None: must be classified)."""
    photo = Image.open(REF / "images" / "rocket.jpg").convert("RGB")
    (folder / "empty.jpg").write_bytes(b"")
    full = (REF / "images" / "rocket.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (folder / "notes.jpg").write_text("this is text\n")
    (folder / "bomb.png").write_bytes(png_header(100_000, 100_000))
    wide = (np.asarray(photo.convert("L")).astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(wide).save(folder / "sixteen.png")
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png")
    Image.new("RGB", (1, 1), (10, 200, 30)).save(folder / "dot.png")
    (folder / "readme.txt").write_text("skipped: not an image name")
    return {
        "bomb.png": "decompression bomb",
        "cmyk.jpg": None,
        "dot.png": None,
        "empty.jpg": "not an image",
        "notes.jpg": "not an image",
        "palette.png": None,
        "sixteen.png": None,
        "truncated.jpg": "truncated",
    }


def test_a_newline_in_a_file_name_cannot_split_a_plain_text_row(model_dir, tmp_path):
    folder = tmp_path / "in\nbox"
    folder.mkdir()
    shutil.copy(REF / "images" / "rocket.jpg", folder / "rocket\n1.jpg")
    (folder / "broken\r.jpg").write_bytes(b"not an image")
    result = cli("classify", folder, "--model", model_dir, "-k", "2", "--no-progress")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0] == str(folder / "rocket\n1.jpg").replace("\n", "\\n")
    assert len(result.stdout.splitlines()) == 3  # the path and its two classes
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: {tmp_path}/in\\nbox/broken\\r.jpg: ")


def test_bad_files_get_one_error_each_and_the_rest_are_classified(model_dir, tmp_path):
    expected = bad_and_odd_images(tmp_path)
    missing = tmp_path / "missing.jpg"
    result = cli("classify", tmp_path, missing, "--model", model_dir, "--json", "-b", "3")
    assert result.exit_code == 1
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    classified = [Path(r["path"]).name for r in rows if "top_k" in r]
    assert classified == sorted(n for n, e in expected.items() if e is None)
    errors = result.stderr.strip().splitlines()
    failing = {n: e for n, e in expected.items() if e} | {"missing.jpg": "no such file"}
    assert len(errors) == len(failing)
    for line in errors:
        name = Path(line.split(": ")[1]).name
        assert line.startswith(f"error: {tmp_path}") and failing[name] in line
    assert "Traceback" not in result.stderr
    # The machine-readable output is complete: a row per input, in order, errors included.
    assert len(rows) == len(expected) + 1
    assert [r["path"] for r in rows] == [*sorted(str(tmp_path / n) for n in expected), str(missing)]
    for row in rows:
        name = Path(row["path"]).name
        assert ("error" in row) == (name in failing) and set(row) in (
            {"path", "error"},
            {"path", "top_k"},
        )
        if "error" in row:
            assert failing[name] in row["error"]

    table = cli("classify", tmp_path, missing, "--model", model_dir, "--csv", "-k", "2")
    assert table.exit_code == 1
    csv_rows = list(csv.reader(io.StringIO(table.stdout)))[1:]
    errors = {Path(r[0]).name: r[5] for r in csv_rows if r[5]}
    assert errors.keys() == failing.keys() and all(failing[n] in e for n, e in errors.items())
    assert all(r[1:5] == ["", "", "", ""] for r in csv_rows if r[5])
    assert len(csv_rows) == len(failing) + 2 * len(classified)


def test_missing_path_alone_is_a_file_error_not_a_usage_error(model_dir, tmp_path):
    result = cli("classify", tmp_path / "nope.jpg", "--model", model_dir)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.jpg'}: no such file or folder"


def test_folder_without_images_says_so(model_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    result = cli("classify", tmp_path, "--model", model_dir)
    assert result.exit_code == 1 and result.stdout == ""
    assert f"error: {tmp_path}: folder has no images" in result.stderr


def test_any_image_agrees_with_collect(tmp_path):
    """The cheap check made before loading a model says yes exactly when `collect` finds
    something to read."""

    hidden = tmp_path / "hidden"
    (hidden / ".thumbs").mkdir(parents=True)
    (hidden / ".thumbs" / "a.jpg").write_bytes(b"x")
    (hidden / "._b.jpg").write_bytes(b"x")
    (hidden / "notes.txt").write_text("hello")
    nested = tmp_path / "nested"
    (nested / "a" / "b").mkdir(parents=True)
    (nested / "a" / "b" / "c.PNG").write_bytes(b"x")
    any_file = tmp_path / "data.bin"
    any_file.write_bytes(b"x")
    cases = {
        (hidden,): False,
        (tmp_path / "missing",): False,
        (hidden, tmp_path / "missing"): False,
        (nested,): True,
        (any_file,): True,  # a file is read whatever its name, as given
        (tmp_path / "missing", nested): True,
    }
    for inputs, expected in cases.items():
        readable = [it for it in images.collect(inputs) if it.error is None]
        assert images.any_image(inputs) is expected is bool(readable), inputs
        assert len(images.errors(inputs)) == len(images.collect(inputs)) - len(readable)


def test_unknown_model_is_a_clear_error(tmp_path):
    result = cli("classify", REF / "images", "--model", "aim-13B")
    assert result.exit_code == 1
    assert "'aim-13B' is neither a known model (aim-600M, aim-1B" in result.stderr


def test_folder_of_checkpoints_is_converted_into_the_cache(tmp_path):
    hub_style = tmp_path / "hf"
    shutil.copytree(REF / "hf_repo", hub_style)
    first = cli("classify", REF / "images", "--model", hub_style, "--json", "--dtype", "float32")
    assert first.exit_code == 0, first.stderr
    assert "converting to float32" in first.stderr
    rows = [json.loads(line) for line in first.stdout.splitlines()]
    assert [[t["index"] for t in r["top_k"]] for r in rows] == [
        expected_top(n) for n in sorted(LOGITS.files)
    ]
    again = cli("classify", REF / "images", "--model", hub_style, "--json", "--dtype", "float32")
    assert again.stdout == first.stdout and "converting" not in again.stderr
    entries = list((tmp_path / "cache" / "models").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("local-hf-")
    # A folder the converter cannot complete on its own says what to do.
    bare = cli("classify", REF / "images", "--model", REF)
    assert bare.exit_code == 1 and "--num-heads" in bare.stderr and "aim-mlx convert" in bare.stderr


def test_embed_head_layers_match_the_reference_features(model):
    from aim_mlx.embed import features

    x = mx.array(np.load(REF / "input.npy")[:1])
    blocks = np.load(REF / "features_best.npy")  # (blocks, 1, N, D): blocks 0..max(PROBE)
    head_tokens = blocks[PROBE].mean(axis=0)  # (1, N, D)
    np.testing.assert_allclose(features(model, x, "head", "tokens"), head_tokens, atol=2e-5)
    np.testing.assert_allclose(
        features(model, x, "head", "mean"), head_tokens.mean(axis=1), atol=2e-5
    )
    chosen = features(model, x, (1, 4), "mean")  # (1, 2, D)
    np.testing.assert_allclose(chosen, blocks[[1, 4]].mean(axis=2).transpose(1, 0, 2), atol=2e-5)


def test_embed_features_takes_layers_and_pool_as_embed_does(model):
    """`features` on a batch of its own: (2, -1) was blocks 2 and 2 (blocks up to 2 were run,
    and -1 took the last of them), and a pool other than "mean" gave the tokens."""
    from aim_mlx.embed import features

    x = mx.array(np.load(REF / "input.npy")[:1])
    last = np.array(model.extract_features(x, -1)[-1].mean(axis=1))  # (1, D)
    np.testing.assert_allclose(features(model, x, (2, -1), "mean")[:, 1], last, atol=1e-6)
    np.testing.assert_array_equal(
        features(model, x, "2,-1", "mean"), features(model, x, [2, 7], "mean")
    )
    for pool in ("Mean", "cls"):
        with pytest.raises(ValueError, match="pool must be one of mean, tokens"):
            features(model, x, "head", pool)


def test_embed_cli_safetensors_and_npy(model, model_dir, tmp_path):
    from safetensors import safe_open

    from aim_mlx.embed import features

    out = tmp_path / "feats.safetensors"
    result = cli("embed", REF / "images", "--out", out, "--model", model_dir, "--layers", "last")
    assert result.exit_code == 0, result.stderr
    with safe_open(out, framework="numpy") as f:
        feats, paths = f.get_tensor("features"), json.loads(f.metadata()["paths"])
    assert [Path(p).name for p in paths] == sorted(LOGITS.files)
    assert feats.shape == (4, 64) and feats.dtype == np.float32
    x = mx.array(np.stack([aim_mlx.preprocess(p) for p in paths]))
    np.testing.assert_allclose(feats, features(model, x, "last", "mean"), atol=1e-5)

    npy = tmp_path / "tokens.npy"
    args = ["--layers", "2,-1", "--pool", "tokens", "--model", model_dir]
    result = cli("embed", REF / "images" / "rocket.jpg", tmp_path / "gone.png", "--out", npy, *args)
    assert result.exit_code == 1  # one missing file, reported; the other embedded
    assert "gone.png: no such file" in result.stderr
    assert np.load(npy).shape == (1, 2, 256, 64)
    listing = (tmp_path / "tokens.npy.paths.txt").read_text()
    assert listing == json.dumps(str(REF / "images" / "rocket.jpg")) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "feats.safetensors", "tokens.npy", "tokens.npy.paths.txt"
    ]  # fmt: skip

    bad = cli("embed", REF / "images", "--out", tmp_path / "f.npy", "--layers", "8",
              "--model", model_dir)  # fmt: skip
    assert bad.exit_code == 2 and "the model has 8 blocks, 0..7 (or -8..-1" in bad.stderr
    bad = cli("embed", REF / "images", "--out", tmp_path / "f.npy", "--layers", "-9",
              "--model", model_dir)  # fmt: skip
    assert bad.exit_code == 2 and "blocks [-9] do not exist" in bad.stderr
    assert not (tmp_path / "f.npy").exists()


def imagenet_folder(root: Path, placement: dict[str, int]) -> Path:
    wnids = {c.index: c.wnid for c in imagenet_classes()}
    for name, cls in placement.items():
        (root / wnids[cls]).mkdir(parents=True, exist_ok=True)
        shutil.copy(REF / "images" / name, root / wnids[cls] / name)
    return root


def test_eval_top1_top5(model_dir, tmp_path):
    # chelsea, camera: in their top-1 class; coffee: in its fourth; rocket: in its 100th.
    placement = {
        "chelsea.png": expected_top("chelsea.png")[0],
        "camera.png": expected_top("camera.png")[0],
        "coffee.png": expected_top("coffee.png")[3],
        "rocket.jpg": int(np.argsort(-LOGITS["rocket.jpg"])[99]),
    }
    data = imagenet_folder(tmp_path / "val", placement)
    result = cli("eval", "--data-path", data, "--model", model_dir, "--json", "-b", "3")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["top1"], report["top5"]) == (50.0, 75.0)
    assert (report["images"], report["classes"], report["failed"]) == (4, 4, [])

    text = cli("eval", "--data-path", data, "--model", model_dir, "--limit", "1")
    # --limit takes images round-robin over classes sorted by WordNet id: the first class's image.
    first = min(placement, key=lambda n: imagenet_classes()[placement[n]].wnid)
    hit = placement[first] == expected_top(first)[0]
    assert (
        text.stdout.startswith(f"top-1 {100.0 * hit:.2f}%") and "(1 image, 1 class)" in text.stdout
    )


def test_eval_refuses_folders_that_are_not_wordnet_ids(model_dir, tmp_path):
    (tmp_path / "cats").mkdir()
    shutil.copy(REF / "images" / "chelsea.png", tmp_path / "cats")
    result = cli("eval", "--data-path", tmp_path, "--model", model_dir)
    assert result.exit_code == 1 and "not: cats" in result.stderr


def test_models_lists_the_official_sizes():
    result = cli("models")
    assert result.exit_code == 0
    assert "aim-1B  (1.22B params; ImageNet-1k top-1: best 82.3%, last 80.6%)" in result.stdout
    assert "aim_7b_5bimgs_attnprobe_backbone.pth  ~25.78 GB  sha256 184ed94c" in result.stdout


def test_unreadable_sub_folder_is_an_error_row_and_the_rest_is_classified(
    model_dir, tmp_path, unreadable
):
    (tmp_path / "locked").mkdir()
    shutil.copy(REF / "images" / "rocket.jpg", tmp_path / "locked")
    shutil.copy(REF / "images" / "chelsea.png", tmp_path)
    result = cli("classify", tmp_path, "--model", model_dir, "--json", "--no-progress")
    assert result.exit_code == 1
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    locked = str(tmp_path / "locked")
    assert rows[0]["path"] == str(tmp_path / "chelsea.png") and "top_k" in rows[0]
    assert rows[1] == {"path": locked, "error": "cannot read the folder: Permission denied"}
    assert result.stderr.strip() == f"error: {locked}: cannot read the folder: Permission denied"

    alone = cli("classify", tmp_path / "locked", "--model", model_dir)  # nothing else to read
    assert alone.exit_code == 1 and "folder has no images" not in alone.stderr
    assert f"error: {locked}: cannot read the folder: Permission denied" in alone.stderr


def test_eval_reports_an_unreadable_class_folder(model_dir, tmp_path, unreadable):
    data = imagenet_folder(tmp_path / "val", {"chelsea.png": 0, "camera.png": 1})
    wnid = imagenet_classes()[1].wnid
    (data / wnid / "locked").mkdir()
    result = cli("eval", data, "--model", model_dir, "--json", "--no-progress")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["images"] == 2
    locked = str(data / wnid / "locked")
    assert report["failed"] == [
        {"path": locked, "error": "cannot read the folder: Permission denied"}
    ]
    assert f"error: {locked}: cannot read the folder" in result.stderr

    (tmp_path / "locked").mkdir()
    top = cli("eval", tmp_path / "locked", "--model", model_dir)
    assert top.exit_code == 1 and "cannot read the folder: Permission denied" in top.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode")
def test_chmod_000_sub_folder_is_reported(model_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    shutil.copy(REF / "images" / "rocket.jpg", locked)
    shutil.copy(REF / "images" / "chelsea.png", tmp_path)
    locked.chmod(0)
    try:
        result = cli("classify", tmp_path, "--model", model_dir, "--no-progress")
    finally:
        locked.chmod(0o755)
    assert result.exit_code == 1 and "chelsea.png" in result.stdout
    assert f"error: {locked}: cannot read the folder: Permission denied" in result.stderr


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_a_pipe_named_like_an_image_in_a_folder_is_an_error_not_a_hang(model_dir, tmp_path):
    """Opening a pipe waits for a writer, forever (and a worker thread stuck there kept the
    process alive through SIGTERM)."""

    shutil.copy(REF / "images" / "rocket.jpg", tmp_path)
    os.mkfifo(tmp_path / "x.jpg")
    reason = "not a regular file (a pipe, socket or device)"
    assert [(Path(it.path).name, it.error) for it in images.collect([tmp_path])] == [
        ("rocket.jpg", None),
        ("x.jpg", reason),
    ]
    proc = subprocess.run(
        [sys.executable, "-c", "from aim_mlx.cli import main; main()", "classify", tmp_path]
        + ["--model", model_dir, "--no-progress", "-k", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "rocket.jpg" in proc.stdout
    assert proc.stderr == f"error: {tmp_path / 'x.jpg'}: {reason}\n"


def test_symlinked_folders_are_searched_once_and_loops_are_not_followed(tmp_path):

    photos = tmp_path / "photos"
    (photos / "b").mkdir(parents=True)
    shutil.copy(REF / "images" / "rocket.jpg", photos / "b")
    shutil.copy(REF / "images" / "chelsea.png", photos / "a.png")
    (photos / "linked").symlink_to(REF / "images", target_is_directory=True)
    (photos / "b" / "up").symlink_to(photos, target_is_directory=True)  # a loop
    found = images.walk_images(str(photos))
    assert found == sorted(
        [str(photos / "a.png"), str(photos / "b" / "rocket.jpg")]
        + [str(photos / "linked" / n) for n in LOGITS.files]
    )


def test_eval_does_not_follow_a_link_back_to_the_data_folder(tmp_path):
    """A class folder's link to the data folder put the other classes' images in that class."""
    from aim_mlx.evaluate import imagenet_folder as listed

    data = imagenet_folder(tmp_path / "val", {"chelsea.png": 0, "rocket.jpg": 1})
    wnid = sorted(p.name for p in data.iterdir())[0]
    (data / wnid / "up").symlink_to(data, target_is_directory=True)
    pairs = listed(data)
    assert sorted(pairs) == sorted([(str(data / wnid / "chelsea.png"), 0),
                                    (str(next(data.glob("*/rocket.jpg"))), 1)])  # fmt: skip


def test_eval_refuses_a_trained_head_and_takes_one_folder_two_ways(model_dir, tmp_path):
    data = imagenet_folder(tmp_path / "val", {"chelsea.png": 0})
    head = tmp_path / "my-head"
    head.mkdir()
    (head / "head.safetensors").write_bytes(b"")  # what tells a trained head's folder
    result = cli("eval", data, "--model", model_dir, "--head", head)
    assert result.exit_code == 2 and "aim-mlx probe eval" in result.stderr
    same = cli("eval", data, "--data-path", str(data) + "/", "-m", model_dir, "--json")
    assert same.exit_code == 0, same.stderr
    assert json.loads(same.stdout)["images"] == 1


def test_eval_with_no_readable_image_reports_no_accuracy(model_dir, tmp_path):
    data = tmp_path / "val"
    (data / imagenet_classes()[0].wnid).mkdir(parents=True)
    (data / imagenet_classes()[0].wnid / "bad.jpg").write_bytes(b"not a jpeg")
    result = cli("eval", data, "--model", model_dir, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert (report["top1"], report["top5"], report["images"]) == (None, None, 0)
    text = cli("eval", data, "--model", model_dir)
    assert text.exit_code == 1 and "top-1" not in text.stdout
    assert "no accuracy: no image could be read" in text.stdout


def test_embed_layers_are_block_numbers_not_rounded(model):
    from aim_mlx.embed import parse_layers

    assert parse_layers([1, np.int64(-1)], 8) == (1, 7) and parse_layers("2,-1", 8) == (2, 7)
    assert parse_layers(3, 8) == (3,)  # one block, as an int
    for wrong in ([1.5], [True], 2.5, [None], "1.5"):  # were blocks 1, 1, ...: silently
        with pytest.raises(ValueError, match="layers must be head, last or block numbers"):
            parse_layers(wrong, 8)


@pytest.mark.parametrize("classes", [10, 1005])
def test_a_head_of_other_than_imagenets_classes_is_not_named_by_them(tmp_path, classes):
    """A checkpoint whose head has another number of classes converts: its classes are not
    ImageNet-1k's (10 classes were named tench, goldfish, ...; past 1000, an IndexError)."""
    from safetensors.numpy import save_file

    from aim_mlx.convert import convert
    from aim_mlx.convert.checkpoint import open_checkpoint

    best = FIXTURE_CONFIG["variants"]["best"]
    ckpt = open_checkpoint(REF / best["head"])
    head = {k: np.asarray(ckpt.load(k)) for k in ckpt.keys()}
    rng = np.random.default_rng(0)
    head["head.linear.weight"] = rng.standard_normal((classes, 64)).astype(np.float32)
    save_file(head, str(tmp_path / "head.safetensors"))
    sources = dict(backbone=REF / "backbone.pth", head=tmp_path / "head.safetensors")
    options = dict(num_heads=4, probe_layers=best["probe_layers"], progress=False)
    folder = convert(tmp_path / "m", **sources, **options)
    model = aim_mlx.load(folder)
    rocket = REF / "images" / "rocket.jpg"
    [row] = aim_mlx.classify(model, rocket, k=classes)
    logits = np.array(model(mx.array(aim_mlx.preprocess(rocket)[None])))[0]
    assert [t["index"] for t in row["top_k"]] == np.argsort(-logits, kind="stable").tolist()
    assert all(t["label"] == f"class {t['index']}" for t in row["top_k"])
    data = imagenet_folder(tmp_path / "val", {"rocket.jpg": 0})  # not its classes: refused
    run = cli("eval", data, "-m", folder)
    assert run.exit_code != 0 and "Traceback" not in run.output
    assert f"the model's head has {classes} classes, not ImageNet-1k's 1000" in run.stderr


def test_python_api_names_what_it_takes(model, model_dir):
    """A notebook's likely slips get an error naming what to give, not an AttributeError."""
    from PIL import Image

    from aim_mlx.embed import embed

    rocket = REF / "images" / "rocket.jpg"
    for run in (aim_mlx.classify, embed):
        with pytest.raises(TypeError, match=r"model: give a loaded model.*got str"):
            run(str(model_dir), [rocket])  # a folder or name, not loaded
        in_memory = (
            r"got {}; an image in memory: x = mx.array\(aim_mlx.preprocess\(image\)\[None\]\), "
            r"then model\(x\) for logits or aim_mlx.embed.features\(model, x, layers, pool\)"
        )
        with pytest.raises(TypeError, match=in_memory.format("JpegImageFile")):
            run(model, Image.open(rocket))  # one PIL image (not iterable)
        with pytest.raises(TypeError, match=in_memory.format("ndarray")):
            run(model, np.zeros((32, 32, 3), np.uint8))  # before: the first row's repr
        with pytest.raises(TypeError, match=in_memory.format("array")):
            run(model, mx.zeros((1, 3, 28, 28)))
        with pytest.raises(
            ValueError, match=r"img_size \(--img-size\) must be a positive multiple of 14"
        ):
            run(model, [rocket], img_size="224")
    assert aim_mlx.classify(model, rocket, img_size=np.int64(112))[0]["path"] == str(rocket)


def test_python_api_checks_its_arguments(model, model_dir):
    from aim_mlx.embed import embed

    rocket = REF / "images" / "rocket.jpg"
    batch, k = r"batch_size \(--batch-size\)", r"k \(--top-k\)"  # the argument, the option
    for options, name in [({"batch_size": -1}, batch), ({"batch_size": 0}, batch),
                          ({"k": -1}, k), ({"k": 0}, k)]:  # fmt: skip
        with pytest.raises(ValueError, match=f"^{name} must be a positive whole number"):
            aim_mlx.classify(model, [rocket], **options)
    with pytest.raises(ValueError, match=rf"^{batch} must be a positive whole number, got -2"):
        embed(model, [rocket], batch_size=-2)
    for wrong in (bytes(rocket), [bytes(rocket)], [rocket, 3]):  # never a row per character
        with pytest.raises(TypeError, match="give paths as str or pathlib.Path"):
            aim_mlx.classify(model, wrong)
    with pytest.raises(ImageError, match=r"the image is empty \(0x5 pixels\)"):
        aim_mlx.preprocess(np.zeros((5, 0, 3), np.uint8))
    for one in (rocket, str(rocket)):  # one path alone is one input
        assert [r["path"] for r in aim_mlx.classify(model, one)] == [str(rocket)]
        assert embed(model, one).paths == [str(rocket)]
    with pytest.raises(TypeError, match="max_block_id must be an int or None, got 2.5"):
        model.extract_features(mx.zeros((1, 3, 28, 28)), 2.5)
    half = aim_mlx.load(model_dir, dtype=mx.float16)
    assert half.dtype == mx.float16
    with pytest.raises(ValueError, match="^dtype must be one of float32, float16, bfloat16"):
        aim_mlx.load(model_dir, dtype=mx.int8)


@pytest.mark.parametrize("layers", ["head", "last", [1, -1]])
@pytest.mark.parametrize("pool", ["mean", "tokens"])
def test_embed_without_a_readable_image_has_the_features_shape(model, tmp_path, layers, pool):
    """No rows, but the shape one image's rows have: results concatenate in a notebook."""
    from aim_mlx.embed import embed

    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    rocket = REF / "images" / "rocket.jpg"
    one = embed(model, [rocket], layers=layers, pool=pool, img_size=112)
    none = embed(model, [tmp_path / "bad.jpg"], layers=layers, pool=pool, img_size=112)
    assert none.paths == [] and len(none.errors) == 1
    assert none.features.shape == (0, *one.features.shape[1:]) and none.features.dtype == np.float32
    assert np.concatenate([none.features, one.features]).shape == one.features.shape


def test_an_image_whose_output_is_not_finite_gets_an_error_not_its_row(tmp_path):
    def fn(x):  # the second image of a batch of two: NaN in one place
        rows = np.ones((x.shape[0], 3), np.float32)
        rows[1:, 2] = np.nan
        return rows

    items = [images.Item(str(REF / "images" / n)) for n in ("camera.png", "coffee.png")]
    got = list(images.run_here(fn, items, not_finite="not finite", size=28, progress=False))
    assert [it.error for it, _ in got] == [None, "not finite"]
    assert got[0][1].tolist() == [1, 1, 1] and got[1][1] is None
    items = [images.Item(str(REF / "images" / n)) for n in ("camera.png", "coffee.png")]
    got = list(images.run_here(fn, items, not_finite=None, size=28, progress=False))
    assert [it.error for it, _ in got] == [None, None] and np.isnan(got[1][1][2])


def no_constants(token):
    raise ValueError(f"not JSON: {token}")


def test_nan_weights_give_error_rows_not_nan_probabilities(model_dir, tmp_path):
    damaged = nan_weights(model_dir, tmp_path)
    why = "the model's output for this image is NaN or Inf: the model's weights may hold NaN"
    run = cli("classify", REF / "images", "-m", damaged, "--json")
    rows = [json.loads(line, parse_constant=no_constants) for line in run.stdout.splitlines()]
    assert run.exit_code == 1 and len(rows) == 4
    assert all(set(r) == {"path", "error"} and r["error"].startswith(why) for r in rows), rows

    placement = {"chelsea.png": expected_top("chelsea.png")[0]}
    data = imagenet_folder(tmp_path / "val", placement)
    run = cli("eval", "--data-path", data, "-m", damaged, "--json")
    result = json.loads(run.stdout, parse_constant=no_constants)
    assert run.exit_code == 1 and result["top1"] is None and result["images"] == 0
    assert [f["error"][: len(why)] for f in result["failed"]] == [why]

    run = cli("embed", REF / "images" / "camera.png", "-m", damaged, "-o", tmp_path / "f.npy")
    assert run.exit_code == 1 and why in run.stderr and not (tmp_path / "f.npy").exists()


def test_float16_overflow_is_named_and_float32_is_suggested(model_dir):
    m = aim_mlx.load(model_dir)
    m.head.linear.weight = m.head.linear.weight * 3e4  # float16 holds it; not the logits
    m.compute_dtype = mx.float16
    rows = aim_mlx.classify(m, REF / "images", k=1)
    assert [r.get("error") for r in rows] == [
        "the model's output for this image is NaN or Inf: float16 overflowed, or the weights "
        "hold NaN or Inf; load the model in dtype bfloat16 or float32 (--dtype), and if that gives "
        "NaN "
        "too, convert the checkpoint again"
    ] * 4
    m.compute_dtype = mx.float32  # the same weights: the reference's top-1 classes
    rows = aim_mlx.classify(m, REF / "images", k=1)
    assert [r["top_k"][0]["index"] for r in rows] == [expected_top(n)[0] for n in sorted(LOGITS)]


def test_eval_names_images_in_no_class_folder(model_dir, tmp_path):
    flat = tmp_path / "flat"  # ImageNet's validation set as downloaded: one flat folder
    flat.mkdir()
    for name in ("chelsea.png", "camera.png"):
        shutil.copy(REF / "images" / name, flat / f"ILSVRC2012_val_{name}")
    result = cli("eval", "--data-path", flat, "--model", model_dir)
    assert result.exit_code == 1 and "its 2 images lie directly in it" in result.stderr
    assert "sort it by its labels first" in result.stderr and "Traceback" not in result.output

    data = imagenet_folder(tmp_path / "val", {"chelsea.png": expected_top("chelsea.png")[0]})
    shutil.copy(REF / "images" / "camera.png", data / "stray.png")
    result = cli("eval", "--data-path", data, "--model", model_dir, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and (report["top1"], report["images"]) == (100.0, 1)
    assert report["failed"] == [{"path": str(data / "stray.png"), "error": images.LOOSE}]
    assert f"error: {data / 'stray.png'}: directly in the dataset folder" in result.stderr


def test_eval_counts_an_image_once_and_refuses_one_in_two_classes(model_dir, tmp_path):
    """A second name of an image in its class (a link, a hard link) is counted once, the other
    name said not to be (exit 1, as for any image not counted); one in another class, an image
    with two labels, is refused before the model is loaded."""
    placement = {name: expected_top(name)[0] for name in ("chelsea.png", "camera.png")}
    data = imagenet_folder(tmp_path / "val", placement)
    wnid = {c.index: c.wnid for c in imagenet_classes()}
    cat, camera = (data / wnid[placement[n]] / n for n in ("chelsea.png", "camera.png"))
    os.link(cat, cat.with_name("zz-hard.png"))
    cat.with_name("zz-soft.png").symlink_to(cat)
    result = cli("eval", data, "--model", model_dir, "--json", "--no-progress")
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and (report["top1"], report["images"]) == (100.0, 2)
    why = f"the same file as {cat}: counted once"
    assert report["failed"] == [
        {"path": str(cat.with_name(name)), "error": why} for name in ("zz-hard.png", "zz-soft.png")
    ]

    camera.with_name("cat-too.png").symlink_to(cat)
    result = cli("eval", data, "--model", tmp_path / "not-loaded", "--no-progress")
    assert result.exit_code == 1 and "Traceback" not in result.output
    # the classes are listed in WordNet-id order: the name met first is kept
    names = sorted([(cat.parent.name, cat), (camera.parent.name, camera.with_name("cat-too.png"))])
    (first_class, first), (second_class, second) = names
    assert result.stderr.splitlines()[-1] == (
        f"Error: {data}: {first} and {second} are one file (a link) in two classes, "
        f"{first_class!r} and {second_class!r}; keep it in one class"
    )


def test_a_link_loop_in_the_dataset_folder_hides_no_loose_image(tmp_path):
    """A link to itself among the images directly in the folder: one entry that cannot be
    looked at, not a reason to leave the others unnamed."""
    from aim_mlx.evaluate import imagenet_folder as listing

    root = tmp_path / "val"
    (root / "n01440764").mkdir(parents=True)
    shutil.copy(REF / "images" / "chelsea.png", root / "n01440764" / "a.png")
    shutil.copy(REF / "images" / "camera.png", root / "stray.png")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    errors = []
    assert listing(root, errors=errors) == [(str(root / "n01440764" / "a.png"), 0)]
    assert errors == [(str(root / p), images.LOOSE) for p in ("loop.jpg", "stray.png")]


def test_a_lazy_model_used_in_another_thread_says_what_to_do(model_dir):
    """MLX computes a lazy array only in the thread that made it: classify in a worker thread,
    on a model just loaded, failed with MLX's bare "There is no Stream(cpu, 0) in current
    thread."."""
    from concurrent.futures import ThreadPoolExecutor

    model = aim_mlx.load(model_dir)  # weights not read yet
    rocket = REF / "images" / "rocket.jpg"
    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(RuntimeError, match=r"mx.eval\(model.parameters\(\)\) after aim"):
            pool.submit(aim_mlx.classify, model, [rocket]).result()
        mx.eval(model.parameters())
        rows = pool.submit(aim_mlx.classify, model, [rocket]).result()
    assert rows == aim_mlx.classify(model, [rocket])


def test_embed_holds_its_features_once(model, tmp_path):
    """Rows go straight into the output array: peak memory about one output, not the rows kept
    apart and then stacked (two outputs at the end; 20,000 token rows ran out of memory)."""
    import tracemalloc

    from aim_mlx.embed import embed

    for i in range(24):
        shutil.copy(REF / "images" / "rocket.jpg", tmp_path / f"{i:02d}.jpg")
    layers = list(range(8))  # 8 x 256 tokens x 64 float32: 512 KiB an image
    tracemalloc.start()
    try:
        emb = embed(model, [tmp_path], layers=layers, pool="tokens", batch_size=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert emb.features.shape == (24, 8, 256, 64) and len(emb.paths) == 24
    assert peak < 1.5 * emb.features.nbytes, (peak, emb.features.nbytes)


def test_embed_refuses_features_larger_than_memory_before_any_work(
    model, model_dir, tmp_path, monkeypatch
):
    from aim_mlx import memory
    from aim_mlx.embed import embed

    monkeypatch.setattr(memory, "host_memory", lambda: (2**17, "memory"))  # 128 KiB
    read, load = [], images._load
    monkeypatch.setattr(images, "_load", lambda *a: read.append(a) or load(*a))
    with pytest.raises(memory.NotEnoughMemoryError, match=r"of 4 images, 256 x 64 float32 each"):
        embed(model, [REF / "images"], pool="tokens")
    out = tmp_path / "new" / "f.npy"
    monkeypatch.setattr("aim_mlx.resolve.load", lambda *a, **k: pytest.fail("model loaded"))
    result = cli("embed", REF / "images", "-o", out, "--pool", "tokens", "-m", model_dir)
    assert result.exit_code == 1 and read == []
    assert "Error: the features of 4 images, 256 x 64 float32 each, take 0.0 GiB, more than " \
        "this machine's 0.0 GiB of memory: embed fewer images" in result.stderr  # fmt: skip
    assert not out.parent.exists()  # refused before the output's folder is made
    assert embed(model, [REF / "images"]).features.shape == (4, 64)  # 1 KiB: fits
    monkeypatch.setenv("AIM_MLX_MEMORY_CHECK", "off")
    assert embed(model, [REF / "images"], pool="tokens").features.shape == (4, 256, 64)
