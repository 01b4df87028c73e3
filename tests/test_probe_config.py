"""Damaged cached features and hand-edited head folders: extracted again, or one clean error
naming the file and the field."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import REF, convert_fixture
from conftest import run_cli as cli
from test_probe import draw_dataset

from aim_mlx.probe import ProbeError, Settings, train

ROCKET = REF / "images" / "rocket.jpg"


pytestmark = pytest.mark.usefixtures("shared_cache")


@pytest.fixture(scope="module")
def model_dir(workdir) -> Path:
    """The fixture converted beside the module's cache, named aim-tiny (not conftest's)."""
    return convert_fixture(workdir / "aim-tiny", name="aim-tiny")


@pytest.fixture(scope="module")
def data(workdir) -> Path:
    return draw_dataset(workdir / "data", per_class=4)


def quick(model_dir, data, out):
    return train(model_dir, data, out, settings=Settings(kind="linear", epochs=1),
                 log=lambda _: None)  # fmt: skip


@pytest.fixture(scope="module")
def head_dir(workdir, model_dir, data) -> Path:
    with pytest.MonkeyPatch.context() as mp, mx.stream(mx.cpu):
        mp.setenv("AIM_MLX_CACHE", str(workdir / "cache"))
        return quick(model_dir, data, workdir / "head").out


def test_damaged_feature_files_are_extracted_again(workdir, model_dir, data, head_dir, tmp_path):
    (folder,) = (workdir / "cache" / "features").iterdir()
    files = sorted(folder.glob("*.npy"))
    good = np.load(files[0])
    files[0].write_bytes(files[0].read_bytes()[:-10])  # cut short
    files[1].write_bytes(b"\x93NUMPY garbage" * 10)  # not a .npy
    files[2].write_bytes(b"")  # empty
    np.save(files[3], good[:10])  # another shape
    np.save(files[4], good.astype(np.float32))  # another dtype
    result = quick(model_dir, data, tmp_path / "again")
    assert result.extracted == 5
    np.testing.assert_allclose(np.load(files[0]), good, rtol=2e-3, atol=1e-3)  # extracted again
    res = cli("probe", "train", data, "-m", model_dir, "-o", tmp_path / "cli", "--epochs", "1",
              "--kind", "linear", "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output


def test_a_feature_file_damaged_after_the_check_is_one_error(workdir, head_dir):
    from aim_mlx.probe.features import FeatureSet

    (folder,) = (workdir / "cache" / "features").iterdir()
    path = sorted(folder.glob("*.npy"))[0]
    store = FeatureSet(folder, {}, (256, 64))
    assert store.has(path.stem)
    path.write_bytes(b"")
    with pytest.raises(ProbeError, match=f"{path}: cannot read the cached features .*"
                       f"`aim-mlx cache rm {folder.name}`"):  # fmt: skip
        store.load([path.stem])


def test_a_diverged_training_writes_no_head(model_dir, data, head_dir, tmp_path):
    """NaN validation loss: was a head with "val_loss": NaN in its config.json (not JSON) whose
    every image then failed with "the model's weights may hold NaN; convert the checkpoint"."""
    out = tmp_path / "head"
    settings = Settings(epochs=2, lr=1e38)
    with pytest.raises(ProbeError, match=r"training diverged: .* every epoch is nan or inf "
                       r"\(the last: nan\); .*lower learning rate \(now 1e\+38\)"):  # fmt: skip
        train(model_dir, data, out, settings=settings, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_a_diverged_epoch_is_never_the_best(model_dir, data, head_dir, tmp_path, monkeypatch):
    """Epoch 2's loss is NaN with the higher top-1 (NaN logits all pick one class, which can be
    the most frequent): epoch 1's weights are kept, not a refused NaN head."""
    from mlx.utils import tree_flatten

    from aim_mlx.probe import training

    real, weights = training.evaluate_features, []

    def second_epoch_diverges(module, *args):
        weights.append({k: np.array(v) for k, v in tree_flatten(module.parameters())})
        loss, top1, top5 = real(module, *args)
        return (loss, top1, top5) if len(weights) == 1 else (float("nan"), 100.0, None)

    monkeypatch.setattr(training, "evaluate_features", second_epoch_diverges)
    result = train(model_dir, data, tmp_path / "head", settings=Settings(epochs=2, kind="linear"),
                   log=lambda _: None)  # fmt: skip
    assert result.best.epoch == 1 and len(weights) == 2
    saved = mx.load(str(tmp_path / "head" / "head.safetensors"))
    assert saved.keys() == weights[0].keys()
    for key, value in weights[0].items():
        np.testing.assert_array_equal(np.array(saved[key]), value)
        assert not np.array_equal(value, weights[1][key]) or "running" in key


@pytest.mark.parametrize(
    "error, advice",
    [  # numpy's short write on a full disk has no errno
        (
            OSError("16384 requested and 4032 written"),
            "(only 4032 of 16384 bytes were written: is the disk full?); free some space, or set",
        ),
        (OSError(28, "No space left on device"), "device); free some space, or set"),
        (OSError(30, "Read-only file system"), "Read-only file system); set AIM_MLX_CACHE"),
    ],
)
def test_a_feature_cache_that_cannot_be_written_is_one_error(tmp_path, monkeypatch, error, advice):
    from aim_mlx.probe.features import FeatureSet

    def fails(file, array):
        file.write(b"\x93NUMPY")
        raise error

    monkeypatch.setattr(np, "save", fails)
    store = FeatureSet(tmp_path, {}, (4, 2))
    message = f"cannot write the feature cache {tmp_path} .*{re.escape(advice)}"
    with pytest.raises(ProbeError, match=message):
        store.write("a" * 64, np.zeros((4, 2), np.float16))
    assert list(tmp_path.iterdir()) == []  # no partial file left


@pytest.mark.parametrize(
    "change, message",
    [
        ({"trunk": None}, "trunk must record the trunk's name, sha256 and num_blocks, got None"),
        ({"trunk": "x"}, "trunk must record the trunk's name, sha256 and num_blocks, got 'x'"),
        ({"classes": None}, "classes must be a list of class names, got None"),
        ({"classes": "ab"}, "classes must be a list of class names, got 'ab'"),
        ({"classes": ["a", "a", "b", "c", "d"]}, "classes name 'a' more than once"),
        ({"classes": ["a", "", "b", "c", "d"]}, "classes must be non-empty strings"),
        ({"kind": "mlp"}, "kind must be one of attention, linear, got 'mlp'"),
        ({"probe_layers": [1, 50]}, "probe layers [50] are outside blocks 0..7"),
        ({"probe_layers": []}, "no probe layers given"),
        ({"probe_layers": [1, 1]}, "probe layers [1, 1] name block 1 more than once"),
        ({"img_size": "224"}, "img_size must be a positive integer, got '224'"),
        ({"img_size": 100}, "img_size 100 must be a multiple of patch_size 14"),
    ],
)
def test_hand_edited_head_config_is_one_line(model_dir, head_dir, tmp_path, change, message):
    folder = tmp_path / "head"
    shutil.copytree(head_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in {**config, **change}.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(config))
    res = cli("classify", ROCKET, "-m", model_dir, "--head", folder, "--no-progress")
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.exception
    assert f"Error: {folder / 'config.json'}: {message}" in res.stderr
