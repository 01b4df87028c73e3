"""The command line's contract: output checks before work, one clean line per user mistake
(exit 1; usage errors exit 2; Ctrl-C 130), tracebacks only for bugs, and the same options on
every command."""

import errno
import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import (
    FIXTURE_CONFIG,
    REF,
    appears_before_publish,
    clean,
    convert_fixture,
    exited_cleanly,
)
from conftest import run_cli as cli
from PIL import Image
from test_hub import registry_entry

import aim_mlx
from aim_mlx import cache, hub, registry, resolve
from aim_mlx.cli import main
from aim_mlx.embed import Embeddings, listing_path, read_listing, save
from aim_mlx.errors import AimMlxError, OutputError, SettingError
from aim_mlx.loader import ModelLoadError, read_config
from aim_mlx.transforms import ImageError, open_image, preprocess

pytestmark = pytest.mark.usefixtures("private_cache")

PROBE = FIXTURE_CONFIG["variants"]["best"]["probe_layers"]
ROCKET = REF / "images" / "rocket.jpg"


@pytest.fixture
def read_only(tmp_path) -> Path:
    """A folder in which no file can be created, whoever runs the tests."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        yield folder
        folder.chmod(stat.S_IRWXU)
    elif sys.platform == "linux" and Path("/sys").is_dir():
        yield Path("/sys")  # read-only even for root
    else:
        pytest.skip("no read-only folder for root on this system")


@pytest.fixture
def two_classes(tmp_path) -> Path:
    """tmp_path / "photos": cat/a.jpg and dog/a.jpg, a folder `probe train` takes."""
    data = tmp_path / "photos"
    for cls in ("cat", "dog"):
        (data / cls).mkdir(parents=True)
        shutil.copy(ROCKET, data / cls / "a.jpg")
    return data


# ---- Output locations are checked before any work ---------------------------------------


def test_embed_checks_its_output_before_loading_the_model(read_only, tmp_path):
    # The model does not exist: only an output check made first can report the output.
    err = clean(cli("embed", ROCKET, "-m", "no-such-model", "-o", read_only / "f.npy"), 1)
    assert f"cannot write {read_only / 'f.npy'}" in err and "not writable" in err
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    err = clean(cli("embed", ROCKET, "-m", "no-such-model", "-o", a_file / "sub" / "f.npy"), 1)
    assert f"cannot create the folder {a_file / 'sub'}" in err
    assert not any(p.suffix == ".npy" for p in tmp_path.rglob("*"))


def test_embed_checks_its_options_before_creating_folders(model_dir, tmp_path):
    for model in (model_dir, tmp_path / "no-model"):  # blocks known, or not: the syntax
        out = tmp_path / "new" / "dir" / "f.npy"
        err = clean(cli("embed", ROCKET, "-m", model, "-o", out, "--layers", "abc"), 2)
        assert "--layers" in err and "'abc'" in err
        assert not (tmp_path / "new").exists()
    err = clean(cli("embed", ROCKET, "-m", model_dir, "-o", tmp_path / ".npy"), 2)
    assert "must end in .safetensors or .npy" in err and not (tmp_path / ".npy").exists()


def test_embed_creates_missing_folders_and_refuses_to_overwrite(model_dir, tmp_path):
    out = tmp_path / "new" / "deeper" / "f.npy"
    result = cli("embed", ROCKET, "-m", model_dir, "-o", out, "--no-progress")
    clean(result, 0)
    first = np.load(out)
    assert first.shape == (1, 64)
    err = clean(cli("embed", ROCKET, "-m", model_dir, "-o", out), 1)
    assert f"{out} already exists" in err and "--force" in err
    listing = listing_path(out)
    out.unlink()  # the listing alone is also refused: the pair is written together
    err = clean(cli("embed", ROCKET, "-m", model_dir, "-o", out), 1)
    assert f"{listing} already exists" in err and not out.exists()
    clean(cli("embed", ROCKET, "-m", model_dir, "-o", out, "--force"), 0)
    np.testing.assert_array_equal(np.load(out), first)


def test_embed_clears_a_killed_runs_listing_even_when_it_refuses_the_output(model_dir, tmp_path):
    """A run killed while writing leaves partial files beside the .npy and its listing: the
    next run clears both, even one that stops because the .npy is there (no --force)."""
    from aim_mlx.output import MACHINE

    out = tmp_path / "f.npy"
    clean(cli("embed", ROCKET, "-m", model_dir, "-o", out, "--no-progress"), 0)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    for name in ("f.npy", "f.npy.paths.txt"):
        (tmp_path / f".{name}.partial-{dead}-deadbeef-{MACHINE}.x").write_text("half")
    err = clean(cli("embed", ROCKET, "-m", model_dir, "-o", out), 1)
    assert f"{out} already exists" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npy", "f.npy.paths.txt"]


def test_convert_checks_its_output(read_only, tmp_path):
    err = clean(cli("convert", "--hf-path", REF / "hf_repo", "-o", read_only / "m"), 1)
    assert f"cannot write {read_only / 'm'}" in err
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    err = clean(cli("convert", "--hf-path", REF / "hf_repo", "-o", a_file / "m"), 1)
    assert f"cannot create the folder {a_file}" in err


def test_export_checks_its_output_before_the_model(read_only):
    pytest.importorskip("coremltools")  # without it, export stops first to say how to install it
    args = ["export", "coreml", "-m", "no-such-model", "-o", read_only / "y.mlpackage"]
    err = clean(cli(*args), 1)
    assert f"cannot write {read_only / 'y.mlpackage'}" in err


def test_export_checks_its_samples_before_the_model(tmp_path):
    pytest.importorskip("coremltools")
    notes = tmp_path / "notes.jpg"
    notes.write_text("not an image")
    for sample in (tmp_path / "missing.jpg", notes):
        # the model does not exist: only a sample check made first can report the sample
        result = cli("export", "coreml", "-m", tmp_path / "no-model", "-o",
                     tmp_path / "m.mlpackage", "--sample", sample)  # fmt: skip
        err = clean(result, 2)
        assert "--sample" in err and sample.name in err and "no-model" not in err


def test_write_atomic_leaves_nothing_half_written(tmp_path):
    from aim_mlx.output import write_atomic

    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def fail_midway(f):
        f.write(b"new, half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(target, fail_midway)
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]
    assert write_atomic(target, lambda f: f.write(b"new")) == target
    assert target.read_bytes() == b"new" and list(tmp_path.iterdir()) == [target]


def test_prepare_output_creates_parents_and_refuses_existing(tmp_path):
    from aim_mlx.output import prepare_output

    target = tmp_path / "a" / "b" / "out.npy"
    assert prepare_output(target) == target and target.parent.is_dir()
    assert list(target.parent.iterdir()) == []  # the write probe is gone
    target.write_text("x")
    with pytest.raises(OutputError, match="already exists"):
        prepare_output(target)
    assert prepare_output(target, force=True) == target


def test_force_never_replaces_an_input_or_a_folder_it_did_not_write(tmp_path):
    # --force once replaced the folder holding the checkpoints it converted (deleting them),
    # and would replace any folder: a user's photos, their home folder.
    src = tmp_path / "checkpoints"
    src.mkdir()
    for name in ("backbone.pth", "head_best_layers.pth"):
        shutil.copy(REF / name, src / name)
    (src / "notes.txt").write_text("precious")
    before = sorted(p.name for p in src.iterdir())
    base = ["convert", "--backbone", src / "backbone.pth", "--head", src / "head_best_layers.pth"]
    base += ["--num-heads", "4", "--probe-layers", ",".join(map(str, PROBE)), "--force"]
    for out in (src, tmp_path):  # the inputs' folder, and a folder above it
        err = clean(cli(*base, "-o", out), 1)
        assert f"the output {out} " in err and "the input" in err
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"not converted")
    err = clean(cli(*base, "-o", other), 1)
    assert "did not write" in err and (other / "cat.jpg").read_bytes() == b"not converted"
    assert sorted(p.name for p in src.iterdir()) == before
    # its own output, and an empty folder, are replaced
    out = tmp_path / "m"
    out.mkdir()
    clean(cli(*base, "-o", out), 0)
    clean(cli(*base, "-o", out), 0)
    assert sorted(p.name for p in out.iterdir()) == [
        "SHA256SUMS",
        "config.json",
        "model.safetensors",
    ]


def test_outputs_never_replace_the_model_or_another_commands_output(
    model_dir, tmp_path, two_classes
):
    from aim_mlx.probe.head import HEAD_FORMAT

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    data = two_classes
    train = ["probe", "train", data, "--epochs", "1", "--force"]
    # the model a head is trained on, and a file inside it
    err = clean(cli(*train, "-m", model, "-o", model), 1)
    assert f"the output {model} is the input {model}" in err
    out = model / "model.safetensors"
    err = clean(cli("embed", ROCKET, "-m", model, "-o", out, "--force"), 1)
    assert f"is inside the input {model}" in err
    # a head inside the training images would be read as a class
    err = clean(cli(*train, "-m", model, "-o", data / "my-head"), 1)
    assert f"the output {data / 'my-head'} is inside the input {data}" in err
    err = clean(cli("probe", "eval", data, "-m", model, "--head", tmp_path / "h",
                    "--confusion", data / "cat" / "a.png"), 1)  # fmt: skip
    assert "is inside the input" in err
    # a config.json alone does not make a folder this command's output
    photos = tmp_path / "project"
    photos.mkdir()
    (photos / "config.json").write_text("{}")
    shutil.copy(ROCKET, photos)
    hf = tmp_path / "hf"
    shutil.copytree(REF / "hf_repo", hf)  # a hub folder's config.json is not a converted model's
    head = tmp_path / "head"
    head.mkdir()
    (head / "config.json").write_text(json.dumps({"format": HEAD_FORMAT, "format_version": 1}))
    for folder in (photos, model):  # neither is a trained head
        assert "did not write" in clean(cli(*train, "-m", model_dir, "-o", folder), 1)
    src = ["--backbone", REF / "backbone.pth", "--head", REF / "head_best_layers.pth"]
    for folder in (photos, hf, head):  # none is a converted model
        assert "did not write" in clean(cli("convert", *src, "-o", folder, "--force"), 1)
    assert (hf / "pytorch_model.bin").is_file() and (photos / ROCKET.name).is_file()
    weights = (model / "model.safetensors").read_bytes()
    assert weights == (model_dir / "model.safetensors").read_bytes()


def test_outputs_never_go_inside_an_input(model_dir, tmp_path):
    # refused the first time too, not only when a re-run would replace it
    hf = tmp_path / "hf"
    shutil.copytree(REF / "hf_repo", hf)
    args = ["convert", "--hf-path", hf, "--num-heads", "4", "--probe-layers", "1,2,3,4,5,6"]
    err = clean(cli(*args, "-o", hf / "mlx"), 1)
    assert f"the output {hf / 'mlx'} is inside the input {hf}" in err
    err = clean(cli("embed", ROCKET, "-m", model_dir, "-o", model_dir / "f.npy"), 1)
    assert "is inside the input" in err and not (model_dir / "f.npy").exists()


def test_an_output_given_as_a_link_replaces_what_it_points_to(tmp_path):
    src = ["--hf-path", REF / "hf_repo", "--num-heads", "4", "--probe-layers", "1,2,3,4,5,6"]
    real, link = tmp_path / "real", tmp_path / "link"
    clean(cli("convert", *src, "-o", real, "--no-progress"), 0)
    link.symlink_to(real)
    clean(cli("convert", *src, "--dtype", "float16", "-o", link, "--force", "--no-progress"), 0)
    assert link.is_symlink() and read_config(real)["dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no leftovers


def test_a_file_output_given_as_a_link_replaces_what_it_points_to(model_dir, tmp_path):
    real, link = tmp_path / "real.safetensors", tmp_path / "link.safetensors"
    real.write_text("old")
    link.symlink_to(real)
    clean(cli("embed", ROCKET, "-m", model_dir, "-o", link, "--force", "--no-progress"), 0)
    from safetensors import safe_open

    with safe_open(real, "np") as f:
        assert json.loads(f.metadata()["paths"]) == [str(ROCKET)]
    assert link.is_symlink()


def test_a_npy_given_as_a_link_gets_its_listing_beside_the_link(model_dir, tmp_path):
    (tmp_path / "real").mkdir()
    link = tmp_path / "lnk.npy"
    link.symlink_to(tmp_path / "real" / "emb.npy")
    listing_path(link).write_text('"stale.jpg"\n"rows.jpg"\n')  # from an earlier run
    result = cli("embed", ROCKET, "-m", model_dir, "-o", link, "--force", "--no-progress")
    assert f"features to {link}, {listing_path(link)}" in clean(result, 0)
    assert read_listing(listing_path(link)) == [str(ROCKET)] and len(np.load(link)) == 1


def test_output_paths_are_resolved_as_the_file_system_does(tmp_path):
    from aim_mlx.output import prepare_output

    # nodir/../f.npy cannot be opened (nodir is missing); the check used to pass and the write
    # after all the work failed
    assert prepare_output(tmp_path / "nodir" / ".." / "f.npy") == tmp_path / "f.npy"
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "data" / "cat")
    with pytest.raises(OutputError, match="is inside the input"):  # link/.. is data, not .
        prepare_output(tmp_path / "link" / ".." / "c.png", inputs=[tmp_path / "data"])


def test_a_cache_inside_the_checkpoint_folder_works(tmp_path, monkeypatch):
    hf = tmp_path / "hf"
    shutil.copytree(REF / "hf_repo", hf)
    monkeypatch.setenv("AIM_MLX_CACHE", str(hf / ".cache"))
    for _ in range(2):  # converted once: the cache's own folder is not part of the source
        result = cli("classify", ROCKET, "-m", hf, "--json", "--no-progress")
        assert result.exit_code == 0, result.output
    assert len(list((hf / ".cache" / "models").iterdir())) == 1


def test_a_stale_cache_entry_that_is_a_link_or_a_file_is_converted_again(tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(REF / "hf_repo", hf)
    first = cli("classify", ROCKET, "-m", hf, "--json", "--no-progress")
    assert first.exit_code == 0, first.output
    (entry,) = (tmp_path / "cache" / "models").iterdir()
    moved = tmp_path / "moved"
    entry.rename(moved)
    config = read_config(moved)
    (moved / "config.json").write_text(json.dumps({**config, "format_version": 0}))
    entry.symlink_to(moved)  # an entry moved to another disk, and older
    again = cli("classify", ROCKET, "-m", hf, "--json", "--no-progress")
    assert again.exit_code == 0, again.output
    assert again.stdout == first.stdout and not entry.is_symlink()
    shutil.rmtree(entry)
    entry.write_text("junk")  # a file in its place
    again = cli("classify", ROCKET, "-m", hf, "--json", "--no-progress")
    assert again.exit_code == 0 and again.stdout == first.stdout, again.output


def test_probe_train_force_never_replaces_its_images(tmp_path, two_classes):
    from aim_mlx.probe import train

    data = two_classes
    for out in (data, tmp_path):  # refused before the model is looked at
        with pytest.raises(OutputError, match="the input"):
            train("no-such-model", data, out, force=True)
    assert sorted(p.name for p in data.rglob("*.jpg")) == ["a.jpg", "a.jpg"]


def test_export_force_replaces_only_a_package(tmp_path):
    from aim_mlx.export.coreml import ExportError, check_output

    folder = tmp_path / "x.mlpackage"
    folder.mkdir()
    (folder / "photo.jpg").write_bytes(b"x")
    with pytest.raises(ExportError, match="did not write"):
        check_output(folder, overwrite=True)
    (folder / "Manifest.json").write_text("{}")
    assert check_output(folder, overwrite=True) == folder
    a_file = tmp_path / "f.mlpackage"
    a_file.write_text("x")
    with pytest.raises(ExportError, match="is a file, not a folder"):
        check_output(a_file, overwrite=True)
    err = clean(cli("export", "coreml", "-m", "no-such-model", "-o", tmp_path / "m.mlmodel"), 2)
    assert "must end in .mlpackage" in err


def test_prepare_output_paths(tmp_path, monkeypatch):
    from aim_mlx.output import prepare_output

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert prepare_output("~/sub/f.npy") == tmp_path / "home" / "sub" / "f.npy"
    monkeypatch.chdir(tmp_path)
    assert prepare_output("f.npy") == tmp_path / "f.npy"  # absolute
    (tmp_path / "d.npy").mkdir()
    with pytest.raises(OutputError, match="is a folder, not a file"):
        prepare_output("d.npy", force=True)
    with pytest.raises(OutputError, match="too long"):
        prepare_output("x" * 240 + ".npy")
    assert not list(tmp_path.glob("x*"))


def test_outputs_given_with_a_tilde_are_written_there(model_dir, tmp_path, monkeypatch):
    # `--out=~/f.npy`: the shell leaves the ~, and the file used to land in a folder named "~"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    clean(cli("embed", ROCKET, "-m", model_dir, "--out=~/f.safetensors", "--no-progress"), 0)
    assert (tmp_path / "home" / "f.safetensors").is_file() and not (tmp_path / "~").exists()
    src = ["--hf-path", REF / "hf_repo", "--probe-layers", ",".join(map(str, PROBE))]
    clean(cli("convert", *src, "--num-heads", "4", "--out=~/m", "--no-progress"), 0)
    assert (tmp_path / "home" / "m" / "config.json").is_file()


def test_a_listing_that_is_a_folder_is_refused_before_work(tmp_path):
    out = tmp_path / "x.npy"
    listing_path(out).mkdir()
    err = clean(cli("embed", ROCKET, "-m", "no-such-model", "-o", out, "--force"), 1)
    assert f"{listing_path(out)} is a folder" in err


def test_a_failed_safetensors_write_is_one_error_line(model_dir, tmp_path, monkeypatch):
    import safetensors.numpy

    def no_space(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", no_space)
    out = tmp_path / "f.safetensors"
    err = clean(cli("embed", ROCKET, "-m", model_dir, "-o", out, "--no-progress"), 1)
    assert f"cannot write {out}: " in err and "No space left" in err
    assert list(tmp_path.iterdir()) == []


def test_probe_train_output_errors_name_the_output(tmp_path, two_classes):
    data = two_classes
    out = tmp_path / "head"
    out.mkdir()
    err = clean(cli("probe", "train", data, "-m", "no-such-model", "-o", out), 1)
    assert f"{out} already exists" in err and "feature cache" not in err


def test_an_output_inside_the_cache_folders_is_refused(model_dir, tmp_path, two_classes):
    # A head written into the cache's models/ folder was listed as an old-format entry and
    # deleted by `cache rm --all`.
    data = two_classes
    models = tmp_path / "cache" / "models"
    err = clean(cli("probe", "train", data, "-m", model_dir, "-o", models / "head"), 1)
    assert f"the output {models / 'head'} is inside the cache folder {models}" in err
    assert not (models / "head").exists()
    features = tmp_path / "cache" / "features"
    err = clean(cli("embed", ROCKET, "-m", model_dir, "-o", features / "e.npy"), 1)
    assert f"is inside the cache folder {features}" in err
    assert not features.exists() or list(features.iterdir()) == []
    # beside them is fine, and the cache's own conversions still write into models/
    assert cli("embed", ROCKET, "-m", model_dir, "-o", tmp_path / "cache" / "e.npy").exit_code == 0
    # a cache setting that is not a folder matters only to commands that use the cache
    (tmp_path / "file").touch()
    result = cli(
        "embed",
        ROCKET,
        "-m",
        model_dir,
        "-o",
        tmp_path / "f.npy",
        env={"AIM_MLX_CACHE": str(tmp_path / "file")},
    )
    assert clean(result, 0).startswith("wrote 1x64 features")


def test_ctrl_c_during_a_swallowing_import_still_interrupts():
    # coremltools' import catches KeyboardInterrupt in bare `except:`; the export then went on
    import signal

    from aim_mlx.output import signals_held

    went_on = []
    with pytest.raises(KeyboardInterrupt), signals_held():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        except BaseException:  # what the import does
            pass
        went_on.append(True)
    assert went_on == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_ctrl_c_stays_ignored():
    # a background job of a script ignores SIGINT: the export's import and an output's
    # replacement hold Ctrl-C back, and must not turn an ignored one into an interruption
    import signal

    from aim_mlx.output import signals_held

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for held in (signals_held,):
            try:
                with held():
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.1)
            except KeyboardInterrupt:
                pytest.fail(f"{held.__name__} raised an ignored Ctrl-C")
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_read_only_cache_names_aim_mlx_cache(read_only, monkeypatch):
    monkeypatch.setenv("AIM_MLX_CACHE", str(read_only / "cache"))
    err = clean(cli("classify", ROCKET, "-m", REF / "hf_repo"), 1)
    assert f"cannot write the model cache {read_only / 'cache'}" in err
    assert "AIM_MLX_CACHE" in err


def test_read_only_download_cache_names_hf_home(read_only):
    with pytest.raises(hub.HubError, match="set HF_HOME"):
        hub.check_download_cache(read_only / "hub")


# ---- Errors: one clean line, tracebacks only for bugs -----------------------------------


def test_every_domain_error_is_an_aim_mlx_error():
    from aim_mlx.convert import CheckpointError, ConversionError, UnsafePickleError
    from aim_mlx.evaluate import DatasetError
    from aim_mlx.export.coreml import ExportError

    errors = [
        CheckpointError, UnsafePickleError, ConversionError, ModelLoadError,
        resolve.ModelNotFoundError, registry.RegistryError, DatasetError, ExportError,
        ImageError, hub.HubError, hub.ChecksumError, hub.DiskSpaceError, cache.CacheError,
        OutputError,
    ]  # fmt: skip
    for error in errors:
        assert issubclass(error, AimMlxError), error
    for error in errors[:-3]:  # the value errors they were before
        assert issubclass(error, ValueError) or issubclass(error, RuntimeError), error


def test_a_bug_shows_its_traceback(monkeypatch, model_dir):
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(resolve, "load", broken)
    result = cli("classify", ROCKET, "-m", model_dir)
    assert isinstance(result.exception, KeyError)  # not turned into a one-line error
    assert result.exit_code == 1


def test_ctrl_c_exits_130(monkeypatch, model_dir, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(resolve, "load", interrupted)
    val = tmp_path / "val" / "n01440764"  # eval checks its folder before loading the model
    val.mkdir(parents=True)
    shutil.copy(ROCKET, val)
    for command in (
        ["classify", ROCKET],
        ["eval", val.parent],
        ["embed", ROCKET, "-o", tmp_path / "x.npy"],
    ):
        result = cli(*command, "-m", model_dir)
        assert result.exit_code == 130, result.output
        assert "interrupted" in result.stderr


def test_ctrl_c_while_click_reads_the_command_line_exits_130(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(click.Group, "parse_args", interrupted)
    result = cli("models")
    assert result.exit_code == 130, result.output
    assert result.stderr == "\ninterrupted\n"  # not click's "Aborted!"


SLOW_IMPORT = """\
import sys, time

class Slow:  # holds the import of one module, as a slow disk or a large library would
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            print("importing", name, flush=True)
            time.sleep(60)

sys.meta_path.insert(0, Slow())
"""


@pytest.mark.parametrize("how", ["aim-mlx", "python -m aim_mlx"])
@pytest.mark.parametrize("loading", ["aim_mlx.blas", "click"])
def test_ctrl_c_while_the_command_loads_exits_130(tmp_path, loading, how):
    """Ctrl-C in the first fraction of a second of `aim-mlx ...`, while modules load (held here
    on `loading`: in the package's __init__, or the command line's own imports): exit 130 with
    one line, as in a command, not a KeyboardInterrupt traceback."""
    import signal

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).parent.parent
    entry = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]["aim-mlx"]
    module, function = entry.split(":")
    hold = SLOW_IMPORT.format(module=loading)
    if how == "aim-mlx":
        script = tmp_path / "aim-mlx"  # as pip writes it, after the hook
        script.write_text(hold + f"from {module} import {function}\nsys.exit({function}())\n")
        command = [sys.executable, str(script)]
    else:  # the hook runs at start-up, before -m imports the package
        (tmp_path / "sitecustomize.py").write_text(hold)
        command = [sys.executable, "-m", "aim_mlx"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])}
    proc = subprocess.Popen(
        [*command, "models"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal
    )
    try:
        assert proc.stdout.readline() == f"importing {loading}\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "Traceback" not in err, err
    assert proc.returncode == 130 and err.strip() == "interrupted"


def test_malformed_config_is_reported_as_such(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"format_version": 1,')
    err = clean(cli("classify", ROCKET, "-m", folder), 1)
    assert f"{folder / 'config.json'}: not valid JSON" in err
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        read_config(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="expected a JSON object"):
        read_config(folder)


def test_cache_treats_a_damaged_entry_as_absent(model_dir, tmp_path, monkeypatch):
    entry = cache.entry_dir("x--best--float32")
    shutil.copytree(model_dir, entry)
    assert cache.is_current(entry)
    (entry / "config.json").write_text("{")
    assert not cache.is_current(entry)
    assert [(e.key, e.config, e.current) for e in cache.list_entries()] == [
        ("x--best--float32", None, False)
    ]


# ---- --head on a converted folder --------------------------------------------------------


def test_an_explicit_head_a_folder_cannot_honour_is_an_error(model_dir):
    err = clean(cli("classify", ROCKET, "-m", model_dir, "--head", "last"), 1)
    assert "converted with the best head" in err and "leave out head (--head)" in err
    with pytest.raises(ModelLoadError, match="not the last one"):
        aim_mlx.load(model_dir, head="last")
    assert aim_mlx.load(model_dir, head="best").args.probe_layers == tuple(PROBE)
    assert aim_mlx.load(model_dir).args.probe_layers == tuple(PROBE)
    err = clean(cli("classify", ROCKET, "-m", model_dir, "--head", "middle"), 2)
    assert "head (--head) must be best, last or a trained head's folder, got 'middle'" in err


def test_folder_head_from_probe_layers():
    official = dict(embed_dim=1536, num_blocks=24)
    assert resolve.folder_head({**official, "probe_layers": list(range(14, 20))}) == "best"
    assert resolve.folder_head({**official, "probe_layers": list(range(18, 24))}) == "last"
    assert resolve.folder_head({**official, "probe_layers": [1, 2, 3]}) is None
    custom = dict(embed_dim=64, num_blocks=8)
    assert resolve.folder_head({**custom, "probe_layers": [1, 2, 3, 4, 5, 6]}) == "best"
    assert resolve.folder_head({**custom, "probe_layers": [2, 3, 4, 5, 6, 7]}) == "last"


def test_a_checkpoint_folder_with_only_a_last_head_uses_it(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(REF / "backbone.pth", folder / "tiny_backbone.pth")
    shutil.copy(REF / "head_last_layers.pth", folder / "tiny_head_last_layers.pth")
    assert resolve.checkpoint_head(folder, None) == "last"
    assert resolve.checkpoint_head(folder, "best") == "best"
    shutil.copy(REF / "head_best_layers.pth", folder / "tiny_head_best_layers.pth")
    assert resolve.checkpoint_head(folder, None) == "best"


# ---- No network ------------------------------------------------------------------------


def test_unreachable_hub_fails_fast_with_advice(tmp_path, monkeypatch):
    registry_file = tmp_path / "registry.json"
    registry_file.write_text(json.dumps({"models": [registry_entry()]}))
    monkeypatch.setenv("AIM_MLX_REGISTRY", str(registry_file))
    with socket.socket() as s:  # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(hub.HubError) as error:
        resolve.resolve(
            "aim-tiny",
            endpoint=f"http://127.0.0.1:{port}",
            hf_cache_dir=tmp_path / "hf",
            progress=False,
        )
    assert time.monotonic() - start < 5  # no rounds of retries
    message = str(error.value)
    assert f"cannot reach the hub (http://127.0.0.1:{port}) for " in message  # the endpoint
    assert "HF_HUB_OFFLINE=1" in message and "cache add" in message and "local folder" in message


# ---- embed output: any file name, both files or neither, usual mode ------------------


def test_npy_listing_round_trips_any_file_name(tmp_path):
    names = [
        "plain.jpg",
        "new\nline.jpg",
        os.fsdecode(b"latin1-\xe9t\xe9.jpg"),  # not UTF-8: a surrogate escape
        'quote" and \\ backslash.jpg',
        "ünïcødé.png",
    ]
    emb = Embeddings(np.arange(10, dtype=np.float32).reshape(5, 2), names)
    out = tmp_path / "f.npy"
    assert save(out, emb) == [out, listing_path(out)]
    lines = listing_path(out).read_bytes().split(b"\n")
    assert len(lines) == 6 and lines[-1] == b""  # one line per row
    assert read_listing(listing_path(out)) == names
    assert os.fsencode(read_listing(listing_path(out))[2]) == b"latin1-\xe9t\xe9.jpg"


def test_embed_cli_with_an_undecodable_file_name(model_dir, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    raw = os.path.join(os.fsencode(folder), b"caf\xe9.jpg")
    with open(raw, "wb") as f:
        f.write(ROCKET.read_bytes())
    out = tmp_path / "w.npy"
    clean(cli("embed", folder, "-m", model_dir, "-o", out), 0)
    (name,) = read_listing(listing_path(out))
    assert os.fsencode(name) == raw
    assert np.load(out).shape == (1, 64)


def test_paths_past_safetensors_header_limit_are_refused_before_any_work(tmp_path, monkeypatch):
    # safetensors refuses a header past 100 MB (about 1.7 million image paths): that was an
    # error after extracting every image's features. Here the limit is lowered to 300 bytes.
    from aim_mlx import embed

    monkeypatch.setattr(embed, "SAFETENSORS_HEADER_MAX", 1300, raising=False)  # 1000: margin
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(20):  # about 500 bytes of paths
        (folder / f"{i:02d}.jpg").write_bytes(b"")
    out = tmp_path / "f.safetensors"
    err = clean(cli("embed", folder, "-m", "no-such-model", "-o", out), 1)  # before the model
    assert err.strip().startswith("Error: the paths of 20 images take") and "write a .npy" in err
    err = clean(cli("embed", folder / "00.jpg", "-m", "no-such-model", "-o", out), 1)
    assert "paths of" not in err  # one path fits: on to the model
    with pytest.raises(OutputError, match="write a .npy"):  # the library says so too
        save(out, Embeddings(np.zeros((20, 2), np.float32), [str(p) for p in folder.iterdir()]))
    assert sorted(tmp_path.iterdir()) == [folder]


def test_npy_and_listing_are_written_both_or_neither(tmp_path, monkeypatch):
    emb = Embeddings(np.zeros((1, 2), np.float32), ["a.jpg"])
    out = tmp_path / "f.npy"

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", fail)
    with pytest.raises(OutputError, match="No space left on device"):
        save(out, emb)
    assert list(tmp_path.iterdir()) == []


def test_a_cache_entry_removed_while_loading_is_made_again(tmp_path, monkeypatch):
    """`aim-mlx cache rm --all` in another process just after this one found its cache entry:
    the entry is converted again, rather than "no config.json; not a converted folder"."""
    folder = shutil.copytree(REF / "hf_repo", tmp_path / "checkpoints")
    convert_into_cache, calls = resolve._convert_into_cache, []

    def removed_by_another_process(key, *args, **kwargs):
        out = convert_into_cache(key, *args, **kwargs)
        calls.append(key)
        if len(calls) == 1:
            cache.remove(key)
        return out

    monkeypatch.setattr(resolve, "_convert_into_cache", removed_by_another_process)
    model = aim_mlx.load(folder)
    assert model.args.num_blocks == FIXTURE_CONFIG["config"]["num_blocks"]
    assert len(calls) == 2 and cache.is_current(cache.entry_dir(calls[0]))
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [calls[0]]


def assert_pair_alone(out: Path, features, names: list) -> None:
    """`out` holds `features` and its listing `names`, the two alone in their folder."""
    assert read_listing(listing_path(out)) == names
    np.testing.assert_array_equal(np.load(out), features)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, listing_path(out).name]


def test_two_runs_replacing_one_pair_leave_one_runs_pair(tmp_path, monkeypatch):
    """Two `embed --force` runs to one -o, the second finishing while the first is between its
    two renames: it waits for the first's pair to be in place (saying so), then replaces it
    whole; never the .npy of one run with the listing of the other."""
    from aim_mlx import embed

    out = tmp_path / "f.npy"
    save(out, Embeddings(np.zeros((1, 2), np.float32), ["old.jpg"]))
    waits, second_waits_or_is_done, threads = [], threading.Event(), []

    def second_run():
        try:
            pair = Embeddings(np.ones((2, 2), np.float32), ["b1.jpg", "b2.jpg"])
            save(out, pair, on_wait=lambda: (waits.append(1), second_waits_or_is_done.set()))
        finally:
            second_waits_or_is_done.set()

    place = embed.place_file

    def first_pauses_after_its_npy(tmp, path, replace):
        place(tmp, path, replace)
        if path == out and not threads:
            threads.append(threading.Thread(target=second_run))
            threads[0].start()
            assert second_waits_or_is_done.wait(60)

    monkeypatch.setattr(embed, "place_file", first_pauses_after_its_npy)
    save(out, Embeddings(np.full((3, 2), 2, np.float32), ["a1.jpg", "a2.jpg", "a3.jpg"]))
    threads[0].join(timeout=60)
    assert not threads[0].is_alive()  # the lock was released: the second run ended
    assert_pair_alone(out, np.ones((2, 2)), ["b1.jpg", "b2.jpg"])  # the second run's, whole
    assert waits == [1]


def test_embed_overlapping_inputs_embed_a_file_once(model_dir, tmp_path):
    """`embed d d/x.jpg` (or d twice, or through a link to d) embeds each image once, under the
    first path that names it, with a note for the others (exit 0: nothing failed); two names of
    one image in the folder (a link beside it) are two rows, as listed."""
    images = tmp_path / "imgs"
    shutil.copytree(REF / "images", images)
    (images / "zz.jpg").symlink_to(images / "rocket.jpg")
    (tmp_path / "again").symlink_to(images)
    out = tmp_path / "f.npy"
    res = cli("embed", images, images / "rocket.jpg", tmp_path / "again", "-m", model_dir,
              "-o", out, "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    names = ["camera.png", "chelsea.png", "coffee.png", "rocket.jpg", "zz.jpg"]
    assert read_listing(listing_path(out)) == [str(images / n) for n in names]
    assert np.load(out).shape == (5, 64)
    rocket = images / "rocket.jpg"
    assert res.stderr.splitlines()[:6] == [
        f"note: {rocket}: listed twice by the inputs; embedded once",
        *(f"note: {tmp_path / 'again' / n}: the same file as {images / n}; embedded once"
          for n in names),
    ]  # fmt: skip


def test_ctrl_c_cannot_split_a_npy_and_its_listing(tmp_path, monkeypatch):
    """Ctrl-C while the .npy is moved into place (--force over another run's pair): the
    listing follows it before the interrupt is raised, never one run's features with the other
    run's image order."""
    import signal

    from aim_mlx import embed

    out = tmp_path / "f.npy"
    save(out, Embeddings(np.zeros((2, 2), np.float32), ["a.jpg", "b.jpg"]))
    replace = os.replace

    def replace_then_interrupt(src, dst):
        replace(src, dst)
        if Path(dst) == out:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(embed.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save(out, Embeddings(np.ones((2, 2), np.float32), ["c.jpg", "d.jpg"]))
    assert_pair_alone(out, np.ones((2, 2)), ["c.jpg", "d.jpg"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("name", ["f.npy", "f.npy.paths.txt", "f.safetensors"])
def test_embed_keeps_an_output_made_while_it_ran(model_dir, tmp_path, monkeypatch, name):
    """Without --force, an output checked at the start but made by another process before the
    features are moved into place is kept: one line naming it, nothing of this run left."""
    folder = tmp_path / "out"
    out = folder / ("f.safetensors" if name == "f.safetensors" else "f.npy")
    theirs = folder / name
    made = appears_before_publish(monkeypatch, theirs, lambda p: p.write_text("theirs"))
    err = clean(cli("embed", ROCKET, "-m", model_dir, "-o", out), 1)
    assert made == [theirs]
    assert err.startswith(f"Error: {theirs} appeared while this command ran")
    assert "pass --force" in err and len(err.splitlines()) == 1
    assert [p.name for p in folder.iterdir()] == [name]  # theirs alone: no temporary, no .npy
    assert theirs.read_text() == "theirs"


@pytest.mark.parametrize("links", [True, False], ids=["hard links", "no hard links"])
@pytest.mark.parametrize("failing", ["f.npy", "f.npy.paths.txt"])
def test_embed_force_that_fails_keeps_the_old_pair(
    model_dir, tmp_path, monkeypatch, failing, links
):
    """--force over a .npy and its listing: when moving one of the new files into place fails,
    both old ones are back, never old features with a new image order (or none)."""
    out = tmp_path / "f.npy"
    save(out, Embeddings(np.zeros((2, 2), np.float32), ["a.jpg", "b.jpg"]))
    replace = os.replace
    if not links:  # the old files are then renamed aside, to be renamed back

        def no_links(*args, **kwargs):
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))

        monkeypatch.setattr(os, "link", no_links)

    def replace_failing(src, dst):
        if Path(dst) == tmp_path / failing and ".partial-" in str(src):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_failing)
    err = clean(cli("embed", ROCKET, "-m", model_dir, "-o", out, "--force"), 1)
    assert err.strip() == f"Error: cannot write {tmp_path / failing}: Input/output error"
    assert_pair_alone(out, np.zeros((2, 2)), ["a.jpg", "b.jpg"])


@pytest.mark.parametrize("name", ["f.safetensors", "f.npy"])
def test_save_writes_a_strided_array_as_its_numbers(tmp_path, name):
    """An Embeddings built in Python may hold a view (a transpose, a slice with a step):
    safetensors wrote its memory as it lies, other numbers than the array's."""
    from safetensors.numpy import load_file

    strided = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    for features in (strided, strided.T.copy().T):
        save(tmp_path / name, Embeddings(features, ["a", "b", "c", "d"]))
        written = np.load(tmp_path / name) if name.endswith(".npy") else \
            load_file(tmp_path / name)["features"]  # fmt: skip
        np.testing.assert_array_equal(written, features)


def test_embed_on_a_full_disk_says_so_and_keeps_the_old_pair(model_dir, tmp_path, monkeypatch):
    """numpy writes a .npy with `tofile`, whose short write on a full disk is an OSError without
    an errno: "N requested and M written"."""
    out = tmp_path / "f.npy"
    save(out, Embeddings(np.zeros((2, 2), np.float32), ["a.jpg", "b.jpg"]))

    def disk_full(path, array, **kwargs):
        Path(path).write_bytes(b"\x93NUMPY")
        raise OSError(f"{array.nbytes} requested and 6 written")

    monkeypatch.setattr(np, "save", disk_full)
    err = clean(cli("embed", ROCKET, "-m", model_dir, "-o", out, "--force"), 1)
    assert err.strip() == f"Error: cannot write {out}: only 6 of 256 bytes were written: is " \
        "the disk full?"  # fmt: skip
    assert_pair_alone(out, np.zeros((2, 2)), ["a.jpg", "b.jpg"])


@pytest.mark.parametrize("links", [True, False], ids=["hard links", "no hard links"])
def test_ctrl_c_while_the_old_pair_is_put_back(tmp_path, monkeypatch, links):
    """Replacing a .npy and its listing fails after the .npy is in place; a Ctrl-C while the old
    pair is put back waits until both are back (it would lose them: the names they were kept
    under are removed on the way out)."""
    import signal

    out = tmp_path / "f.npy"
    save(out, Embeddings(np.zeros((2, 2), np.float32), ["a.jpg", "b.jpg"]))
    replace = os.replace
    if not links:

        def no_links(*args, **kwargs):
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))

        monkeypatch.setattr(os, "link", no_links)

    def replace_failing(src, dst):
        if ".partial-" in str(src) and Path(dst) == listing_path(out):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        if ".old-" in str(src) and Path(dst) == out:  # putting the old .npy back
            signal.raise_signal(signal.SIGINT)
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_failing)
    with pytest.raises(KeyboardInterrupt):
        save(out, Embeddings(np.ones((2, 2), np.float32), ["c.jpg", "d.jpg"]))
    assert_pair_alone(out, np.zeros((2, 2)), ["a.jpg", "b.jpg"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_one_file_replaced_stays_in_place_until_the_new_one_is(tmp_path, monkeypatch):
    """Replacing a .safetensors on a disk without hard links: the old file keeps its name until
    the new one takes it (renamed aside, a SIGKILL there would lose it: the next run removes
    what a killed one left beside the output)."""
    from safetensors.numpy import load_file

    out = tmp_path / "f.safetensors"
    save(out, Embeddings(np.zeros((2, 2), np.float32), ["a.jpg", "b.jpg"]))

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    replace, there = os.replace, []

    def replace_looking(src, dst):
        if Path(dst) == out:
            there.append(out.exists())
        return replace(src, dst)

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(os, "replace", replace_looking)
    save(out, Embeddings(np.ones((2, 2), np.float32), ["c.jpg", "d.jpg"]))
    assert there == [True]
    np.testing.assert_array_equal(load_file(out)["features"], np.ones((2, 2)))
    assert [p.name for p in tmp_path.iterdir()] == ["f.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_safetensors_gets_the_usual_file_mode(model_dir, tmp_path, monkeypatch, umask):
    """Without setting the umask to read it: that is process-wide, and a file another thread
    created in between got 0o666, whatever the user's umask."""
    old = os.umask(umask)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("os.umask called"))
        for name in ("f.safetensors", "f.npy"):
            clean(cli("embed", ROCKET, "-m", model_dir, "-o", tmp_path / name), 0)
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    finally:
        monkeypatch.undo()
        os.umask(old)


# ---- Images ----------------------------------------------------------------------------


def test_float_images_are_read_as_intensities(tmp_path):
    gray = np.asarray(Image.open(ROCKET).convert("L"))
    Image.fromarray(gray.astype(np.float32) / 255.0, mode="F").save(tmp_path / "f.tiff")
    Image.fromarray(gray).save(tmp_path / "l.png")
    np.testing.assert_array_equal(preprocess(tmp_path / "f.tiff"), preprocess(tmp_path / "l.png"))
    Image.fromarray(gray.astype(np.float32), mode="F").save(tmp_path / "levels.tiff")
    with pytest.raises(ImageError, match="expected intensities in 0..1"):
        open_image(tmp_path / "levels.tiff")


def test_decompression_bomb_message_names_our_setting(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    path = tmp_path / "small.png"
    Image.new("RGB", (100, 50)).save(path)
    monkeypatch.setenv("AIM_MLX_MAX_PIXELS", "4000")
    with pytest.raises(ImageError, match="more than 4000 pixels.*AIM_MLX_MAX_PIXELS"):
        open_image(path)
    monkeypatch.setenv("AIM_MLX_MAX_PIXELS", "0")
    assert open_image(path).size == (100, 50)
    monkeypatch.setenv("AIM_MLX_MAX_PIXELS", "lots")
    with pytest.raises(AimMlxError, match="whole number"):
        open_image(path)


BAD_SETTINGS = [
    ("AIM_MLX_CPU_CORES", "abc"), ("AIM_MLX_CPU_CORES", "0"), ("AIM_MLX_CPU_STREAMS", "-1"),
    ("AIM_MLX_MEMORY_CHECK", "maybe"), ("AIM_MLX_MAX_PIXELS", "abc"),
    ("AIM_MLX_MAX_PIXELS", "-1"), ("AIM_MLX_RANK_TIMEOUT", "abc"),
    ("AIM_MLX_RANK_TIMEOUT", "inf"), ("AIM_MLX_CUDA_KERNELS", "bogus"),
    ("AIM_MLX_BUFFER_LIMIT", "nah"), ("AIM_MLX_CPU_CACHE_MB", "1GB"),
    ("AIM_MLX_CPU_CORES", "\u00b2"), ("AIM_MLX_CPU_CACHE_MB", "\u00b2"),  # isdigit, not int
]  # fmt: skip


@pytest.mark.parametrize("variable, value", BAD_SETTINGS)
def test_bad_settings_are_one_error_before_any_work(variable, value, monkeypatch, tmp_path):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    monkeypatch.setenv(variable, value)
    # a model that does not exist: the setting is reported first, before the model is looked at
    result = cli("classify", ROCKET, "-m", tmp_path / "no-model")
    stderr = clean(result, 1)
    assert stderr.startswith(f"Error: {variable}") and f"{value!r}" in stderr
    assert "no-model" not in stderr and "Usage:" not in stderr and len(stderr.splitlines()) == 1


@pytest.mark.parametrize("variable, value", BAD_SETTINGS)
def test_bad_settings_stop_the_library_load_before_any_work(variable, value, monkeypatch):
    """aim_mlx.load, as the command line: the setting's error before the model is looked at
    (a download and a conversion), not at the first forward pass."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    monkeypatch.setattr(resolve, "load", lambda *a, **k: pytest.fail("the model was looked at"))
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingError, match=f"^{variable}="):
        aim_mlx.load("aim-600M")


def test_a_small_pixel_limit_gives_the_right_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    Image.new("RGB", (200, 200)).save(tmp_path / "square.png")
    monkeypatch.setenv("AIM_MLX_MAX_PIXELS", "50000")
    with pytest.raises(ImageError) as caught:
        preprocess(tmp_path / "square.png")
    assert "aspect ratio" not in str(caught.value)
    assert "256x256 for the model would pass the limit of 50000 pixels" in str(caught.value)
    assert "AIM_MLX_MAX_PIXELS" in str(caught.value)


def run_classify(model_dir, redirect: str) -> subprocess.CompletedProcess:
    """`aim-mlx classify ROCKET --json` in a shell, its stdout redirected as `redirect` says."""
    command = f"{shlex.quote(sys.executable)} -m aim_mlx.cli classify {shlex.quote(str(ROCKET))}"
    command += f" -m {shlex.quote(str(model_dir))} --json --no-progress {redirect}"
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_results_that_cannot_be_written_to_stdout_are_an_error(model_dir):
    full = run_classify(model_dir, "> /dev/full")
    assert full.returncode == 1 and "Traceback" not in full.stderr
    assert full.stderr.strip() == "Error: cannot write to standard output: No space left on device"
    closed = run_classify(model_dir, ">&-")
    assert closed.returncode == 1 and "Traceback" not in closed.stderr
    assert (
        closed.stderr.strip() == "Error: standard output is closed: the results cannot be written"
    )


def aim_mlx_in_shell(args: str, env=None) -> subprocess.CompletedProcess:
    command = f"{shlex.quote(sys.executable)} -m aim_mlx.cli {args}"
    env = {**os.environ, **(env or {})}
    return subprocess.run(["sh", "-c", command], capture_output=True, env=env)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_help_and_the_cache_listing_report_a_full_stdout_too():
    for args in ("cache > /dev/full", "--help > /dev/full", "--version >&-", "cache >&-"):
        run = aim_mlx_in_shell(args)
        assert run.returncode == 1 and b"Traceback" not in run.stderr, (args, run.stderr)
        assert run.stderr.decode().startswith("Error: ") and len(run.stderr.splitlines()) == 1


def test_listings_leave_out_a_download_removed_while_they_list(monkeypatch, tmp_path):
    """`cache list` and `models` while `cache rm-downloads` runs in another process: a file
    found in huggingface_hub's cache and removed before its size is read is left out (listed as
    not downloaded), not a FileNotFoundError traceback."""
    monkeypatch.setattr(hub, "cached_path", lambda *args, **kwargs: tmp_path / "removed.pth")
    listing = cli("cache", "list", "--json")
    assert listing.exit_code == 0, listing.output
    assert json.loads(listing.stdout)["downloads"] == []
    overview = cli("models", "--json")
    assert overview.exit_code == 0, overview.output
    files = [f for row in json.loads(overview.stdout) for f in row["files"]]
    assert files and not any(f["downloaded"] for f in files)
    assert all(f["size"] for f in files)  # the registry's sizes, as for files not downloaded


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS names are UTF-8")
def test_a_model_folder_whose_name_is_not_utf8_is_named_as_such(model_dir, tmp_path):
    """MLX opens UTF-8 paths only (std::bad_cast): the error says so and what to do, not that
    the model is damaged and should be converted again."""
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9-model"))
    try:
        shutil.copytree(model_dir, odd)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    res = cli("classify", ROCKET, "-m", odd)
    exited_cleanly(res, 1)
    assert "MLX cannot open a file whose path is not valid UTF-8; rename the folder" in res.stderr
    assert "convert the model again" not in res.stderr


def test_results_reach_a_stdout_that_cannot_encode_them(model_dir, tmp_path):
    # an ASCII-configured stdout: click writes UTF-8 to its byte stream (the wrapper hid it)
    folder = tmp_path / "ünï"
    folder.mkdir()
    shutil.copy(ROCKET, folder / "ï.jpg")
    args = f"classify {shlex.quote(str(folder))} -m {shlex.quote(str(model_dir))} -k 1"
    for form in ("", "--csv"):  # (--json escapes what is not ASCII)
        run = aim_mlx_in_shell(f"{args} {form}", env={"PYTHONIOENCODING": "ascii"})
        assert run.returncode == 0, run.stderr
        assert str(folder / "ï.jpg").encode() in run.stdout
    # an ASCII locale: the file name's bytes pass through (surrogateescape), as they came in
    run = aim_mlx_in_shell(f"{args} --csv", env={"LC_ALL": "C", "PYTHONUTF8": "0"})
    assert run.returncode == 0 and str(folder / "ï.jpg").encode() in run.stdout, run.stderr


def test_a_file_name_that_is_not_utf8_reaches_a_strict_utf8_stdout(model_dir, tmp_path):
    # A Linux desktop's UTF-8 locale encodes stdout strictly; a name from a Latin-1 archive
    # (bytes that are not UTF-8) was a UnicodeEncodeError traceback, the rows after it lost.
    folder = os.fsencode(tmp_path)
    for name in (b"caf\xe9.jpg", b"z.jpg"):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(ROCKET.read_bytes())
    args = f"classify {shlex.quote(str(tmp_path))} -m {shlex.quote(str(model_dir))} -k 1"
    for form in ("", "--csv"):
        run = aim_mlx_in_shell(f"{args} {form}", env={"PYTHONIOENCODING": "utf-8:strict"})
        assert run.returncode == 0 and b"Traceback" not in run.stderr, run.stderr
        lines = run.stdout.splitlines()
        first = next(i for i, line in enumerate(lines) if b"caf" in line)
        assert lines[first].startswith(os.path.join(folder, b"caf\xe9.jpg"))  # its own bytes
        assert any(line.startswith(os.path.join(folder, b"z.jpg")) for line in lines[first:])


def test_a_closed_stderr_loses_only_the_messages(model_dir):
    run = aim_mlx_in_shell(f"classify {shlex.quote(str(ROCKET))} -m {model_dir} --json 2>&-")
    assert run.returncode == 0 and json.loads(run.stdout)["path"] == str(ROCKET)


def test_the_cli_gives_sys_stdout_back():
    before = sys.stdout
    main(["models"], standalone_mode=False)
    assert sys.stdout is before


def test_runs_in_threads_give_sys_stdout_back():
    """Two runs at once (a notebook's threads): the one that started second ends last, and gave
    back the wrapper the first had put in place, for good."""
    from aim_mlx.cli import Group

    both_in, first_out = threading.Barrier(2), threading.Event()

    @click.group(cls=Group)
    def group():
        pass

    @group.command()
    @click.argument("order")
    def run(order):
        both_in.wait()
        if order == "second":
            first_out.wait()

    def first():
        group.main(["run", "first"], standalone_mode=False)
        first_out.set()

    before = sys.stdout
    threads = [threading.Thread(target=first)]
    threads.append(threading.Thread(target=group.main, args=(["run", "second"], None, None, False)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sys.stdout is before


@pytest.mark.parametrize("command", [["models"], ["cache", "list"]])
def test_the_cli_gives_the_sigterm_handler_back(command):
    """SIGTERM exits through cleanup code while a command runs; afterwards the process (a
    notebook that called main) handles SIGTERM as it did before."""
    import signal

    def mine(*_):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        main(command, standalone_mode=False)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("command", [["models"], ["info"], ["cache", "list"], ["cache"]])
def test_commands_that_read_no_setting_run_whatever_the_settings(command, monkeypatch):
    monkeypatch.setenv("AIM_MLX_CPU_CORES", "abc")
    monkeypatch.setenv("AIM_MLX_MAX_PIXELS", "-5")
    result = cli(*command)
    assert result.exit_code == 0, result.output
    if command == ["info"]:  # the diagnostic command shows what is wrong
        assert "settings: invalid: AIM_MLX_CPU_CORES='abc'" in result.stdout
        with mx.stream(mx.cpu):  # the CPU streams line: where the CPU runs the model
            on_cpu = cli(*command)
        assert "cpu_streams: invalid: AIM_MLX_CPU_CORES='abc'" in on_cpu.stdout


def test_info_json_shows_an_unusable_registry(monkeypatch, tmp_path):
    monkeypatch.setenv("AIM_MLX_REGISTRY", str(tmp_path / "missing.json"))
    result = cli("info", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert "cannot read the registry file" in info["settings"]
    assert "cannot read the registry file" in info["cache"]["error"]


def test_probe_layers_named_twice_are_one_error_before_loading(model_dir, tmp_path, two_classes):
    data = two_classes
    for model in (model_dir, REF / "hf_repo"):  # a checkpoint folder: before converting it
        args = ["probe", "train", data, "-m", model, "-o", tmp_path / "h", "--probe-layers"]
        err = clean(cli(*args, "1,1"), 1)
        assert (
            "probe_layers (--probe-layers): probe layers [1, 1] name block 1 more than once" in err
        )
    err = clean(cli(*args, "-1"), 1)  # the block count is not known yet: no made-up range
    assert "probe layers [-1] are not block indices (0 or more)" in err
    assert not (tmp_path / "cache" / "models").exists()


def test_eval_head_that_is_no_head_is_a_usage_error(tmp_path):
    data = tmp_path / "val" / "n01440764"
    data.mkdir(parents=True)
    shutil.copy(ROCKET, data)
    err = clean(cli("eval", data.parent, "-m", "no-such-model", "--head", "BEST"), 2)
    assert "must be best or last, got 'BEST'" in err and "probe eval" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = clean(cli("eval", data.parent, "-m", "no-such-model", "--head", empty), 2)
    assert "must be best or last" in err
    model = tmp_path / "model"  # a converted model (config.json and weights) is no head
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    err = clean(cli("eval", data.parent, "-m", "no-such-model", "--head", model), 2)
    assert "is a converted model, not a head: give it as -m" in err


def test_a_broken_pipe_is_left_to_click_which_exits_quietly():
    from aim_mlx.cli import _Stdout

    class ReaderGone:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        _Stdout(ReaderGone()).write("row")


# ---- The same options everywhere --------------------------------------------------------


COMMANDS_WITH_BARS = [
    ["convert"],
    ["classify"],
    ["embed"],
    ["eval"],
    ["cache", "add"],
    ["export", "coreml"],
]


@pytest.mark.parametrize("command", COMMANDS_WITH_BARS)
def test_progress_option_everywhere(command):
    result = cli(*command, "--help")
    clean(result, 0)
    assert "--progress / --no-progress" in result.stdout


@pytest.mark.parametrize(
    "command, options",
    [
        (["convert"], ["-o, --out", "--force"]),
        (["embed"], ["-o, --out", "--force", "-m, --model", "-b, --batch-size", "--img-size"]),
        (["export", "coreml"], ["-o, --out", "--force", "-m, --model", "--img-size"]),
        (["bench"], ["-m, --model", "-b, --batch-size", "--img-size", "--json"]),
        (["classify"], ["-m, --model", "-b, --batch-size", "-k, --top-k", "--img-size"]),
        (["eval"], ["-m, --model", "-b, --batch-size", "--img-size", "--data-path", "--json"]),
        (["cache", "list"], ["--json"]),
        (["info"], ["--json"]),
    ],
)
def test_common_options(command, options):
    text = cli(*command, "--help").stdout
    for option in options:
        assert option in text, (command, option)


@pytest.mark.parametrize("command", [["cache", "add"], ["eval"]])
def test_help_offers_official_heads_only(command):
    """`cache add` and `eval` take best or last, not a trained head's folder: their help says so
    (eval points a trained head to `probe eval`)."""
    text = " ".join(cli(*command, "--help").stdout.split())
    assert "best or last: which official head" in text and "probe train" not in text


def test_export_help_does_not_offer_quantize():
    """`export coreml` refuses -q (a package holds float weights): its help listed -q as 'Quantize
    the trunk's linear layers.' and --q-bits beside it."""
    text = cli("export", "coreml", "--help").stdout
    assert "--compress" in text
    assert "--quantize" not in text and "--q-bits" not in text


def test_cache_add_refuses_a_trained_head():
    refused = cli("cache", "add", "aim-600M", "--head", "my-head")
    assert "must be one of best, last" in clean(refused, 2)


def test_usage_errors_exit_2(model_dir, tmp_path):
    assert "--backbone FILE" in clean(cli("convert", "-o", tmp_path / "m"), 2)
    both = cli("convert", "--hf-path", "x", "--backbone", "b.pth", "-o", tmp_path / "m")
    assert "not both" in clean(both, 2)
    bad_layers = cli("convert", "--hf-path", "x", "--probe-layers", "a,b", "-o", tmp_path / "m")
    assert "Error: probe_layers (--probe-layers) must be best, last" in clean(bad_layers, 2)
    assert "multiple of 14" in clean(cli("classify", ROCKET, "-m", model_dir, "--img-size", 30), 2)
    assert "missing the data folder" in clean(cli("eval", "-m", model_dir), 2)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["classify", ROCKET, "-m", "MODEL", "--q-bits", "4"],
        ["bench", "--model", "aim-600M", "--q-bits", "8"],
        ["probe", "train", "DATA", "-m", "MODEL", "-o", "OUT", "--q-bits", "4"],
        ["convert", "--hf-path", "MODEL", "-o", "OUT", "--q-group-size", "32"],
        # before any work: a folder without images, an output's folders, a data folder's listing
        ["classify", "DATA", "-m", "MODEL", "--q-bits", "4"],
        ["embed", ROCKET, "-m", "MODEL", "-o", "OUT_NPY", "--q-bits", "4"],
        ["eval", "DATA", "-m", "MODEL", "--q-bits", "4"],
        ["probe", "eval", "DATA", "-m", "MODEL", "--head", "best", "--q-bits", "4"],
    ],
    ids=["classify", "bench", "probe train", "convert"]
    + ["classify no image", "embed", "eval", "probe eval"],
)
def test_quantization_settings_without_q_are_refused(model_dir, tmp_path, command):
    """--q-bits (or --q-group-size) without -q was ignored: the weights stayed unquantized."""
    where = {"MODEL": model_dir, "DATA": tmp_path, "OUT": tmp_path / "out"}
    where |= {"OUT_NPY": tmp_path / "out" / "f.npy", "OUT_PKG": tmp_path / "out" / "m.mlpackage"}
    option = command[-2]
    err = clean(cli(*[where.get(a, a) for a in command]), 2)
    assert f"{option} is for quantized weights: add -q (--quantize)" in err
    assert not (tmp_path / "out").exists()


def test_img_size_on_classify_embed_and_eval(model_dir, tmp_path):
    model = aim_mlx.load(model_dir)
    x = mx.array(preprocess(ROCKET, 112)[None])
    expected = np.argsort(-np.array(model(x))[0], kind="stable")[:3].tolist()
    out = cli("classify", ROCKET, "-m", model_dir, "--img-size", 112, "--json", "-k", 3).stdout
    assert [t["index"] for t in json.loads(out)["top_k"]] == expected
    default = cli("classify", ROCKET, "-m", model_dir, "--json", "-k", 3).stdout
    assert json.loads(default)["top_k"] != json.loads(out)["top_k"]  # the size did change

    npy = tmp_path / "f.npy"
    clean(
        cli("embed", ROCKET, "-m", model_dir, "-o", npy, "--img-size", 112, "--pool", "tokens"), 0
    )
    assert np.load(npy).shape == (1, 64, 64)  # (112 / 14)^2 tokens


def test_eval_takes_the_data_folder_positionally_or_as_data_path(model_dir, tmp_path):
    from aim_mlx.labels import imagenet_classes

    (tmp_path / "val" / imagenet_classes()[0].wnid).mkdir(parents=True)
    (tmp_path / "val" / imagenet_classes()[0].wnid / "r.jpg").write_bytes(ROCKET.read_bytes())
    positional = cli("eval", tmp_path / "val", "-m", model_dir, "--json")
    alias = cli("eval", "--data-path", tmp_path / "val", "-m", model_dir, "--json")
    clean(positional, 0)
    assert json.loads(positional.stdout) == json.loads(alias.stdout)
    assert json.loads(positional.stdout)["images"] == 1
    other = tmp_path / "other"
    other.mkdir()
    assert "once" in clean(cli("eval", tmp_path / "val", "--data-path", other), 2)


def test_json_listings_of_cache_and_info(model_dir):
    result = cli("info", "--json")
    clean(result, 0)
    info = json.loads(result.stdout)
    assert info["mlx_version"] == mx.__version__
    assert cli("classify", ROCKET, "-m", REF / "hf_repo", "--no-progress").exit_code == 0
    listing = json.loads(cli("cache", "list", "--json").stdout)
    assert listing["cache"] == os.environ["AIM_MLX_CACHE"]
    (entry,) = listing["models"]
    assert entry["key"].startswith("local-hf_repo-") and entry["current"] is True
    assert entry["size"] == sum(p.stat().st_size for p in Path(entry["path"]).iterdir())


def test_rm_downloads_says_when_there_is_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    result = cli("cache", "rm-downloads", "aim-1B")
    clean(result, 0)
    assert "nothing to remove: no downloads of aim-1B" in result.stdout
    # a model taken out of the registry: its downloads are hf's to remove
    err = clean(cli("cache", "rm-downloads", "aim-gone"), 1)
    assert "unknown model 'aim-gone'; known models: aim-600M" in err
    assert "no longer registered: `hf cache ls`, then `hf cache rm model/ORG/NAME`" in err
    # an unreadable registry file is its own error, not a model that is no longer registered
    (tmp_path / "registry.json").write_text('{"models": [')
    monkeypatch.setenv("AIM_MLX_REGISTRY", str(tmp_path / "registry.json"))
    for names in ([], ["aim-1B"]):
        err = clean(cli("cache", "rm-downloads", *names), 1)
        assert "cannot read the registry file" in err and "no longer registered" not in err


def test_a_write_failure_during_conversion_is_one_line(tmp_path, monkeypatch):
    from aim_mlx.convert import converter

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(converter.SafetensorsWriter, "write", disk_full)
    err = clean(cli("convert", "--hf-path", REF / "hf_repo", "-o", tmp_path / "m"), 1)
    assert "No space left on device" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform != "linux", reason="/proc is Linux's")
def test_convert_into_proc_is_refused_before_work(tmp_path):
    err = clean(cli("convert", "--hf-path", REF / "hf_repo", "-o", "/proc/m"), 1)
    assert "cannot write /proc/m" in err


def test_damaged_weights_file_is_one_clean_line(tmp_path):
    """A converted folder whose safetensors file is damaged: one line naming the file."""
    from conftest import REF

    folder = convert_fixture(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\0" * 100)
    result = CliRunner().invoke(main, ["classify", str(REF / "images"), "-m", str(folder)])
    assert f"{folder / 'model.safetensors'}: cannot read the weights" in clean(result, 1)


def test_bench_refuses_a_model_larger_than_memory_before_making_it(monkeypatch):
    from aim_mlx import memory

    class Made(Exception):
        pass

    def random_model(*args, **kwargs):  # a stand-in: this test makes no 1B model
        raise Made

    monkeypatch.setattr("aim_mlx.bench.random_model", random_model)
    monkeypatch.setattr(memory, "device_memory", lambda: (4 * 2**30, "memory"))
    # aim-1B: 1,219,813,376 parameters (upstream README) = 4.54 GiB in float32, 1.14 in 8 bits
    err = clean(cli("bench", "--model", "aim-1B", "--dtype", "float32"), 1)
    assert "aim-1B in float32: the weights alone take 4.5 GiB, more than this machine's " in err
    assert "4.0 GiB of memory; use half precision: dtype float16 or bfloat16 (--dtype)" in err
    monkeypatch.setattr(memory, "device_memory", lambda: (1 * 2**30, "memory"))
    err = clean(cli("bench", "--model", "aim-1B", "-q", "--q-bits", "8"), 1)
    assert "aim-1B in 8-bit: the weights alone take 1.1 GiB, more than this machine's 1.0" in err
    monkeypatch.setattr(memory, "device_memory", lambda: (2 * 2**30, "memory"))
    assert isinstance(cli("bench", "--model", "aim-1B", "-q", "--q-bits", "8").exception, Made)
    # every configuration is checked before the first runs (it ran, then the next was refused)
    monkeypatch.setattr(memory, "device_memory", lambda: (4 * 2**30, "memory"))
    err = clean(cli("bench", "--model", "aim-1B", "--dtype", "float16,float32"), 1)
    assert "aim-1B in float32: the weights alone take 4.5 GiB" in err
    monkeypatch.setattr(memory, "device_memory", lambda: (None, ""))  # unknown: no check
    assert isinstance(cli("bench", "--model", "aim-1B").exception, Made)
    assert isinstance(cli("bench", "--model", "AIM-1b").exception, Made)  # any case, as elsewhere


def test_device_memory_is_the_machines_on_the_cpu():
    from aim_mlx import memory

    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        pytest.skip("/proc/meminfo is Linux's")
    total_kib = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
    # this test's CPU only (pin_cpu would keep it for the module's later tests)
    with mx.stream(mx.cpu):
        assert memory.device_memory() == (total_kib * 1024, "memory")
        info = cli("info")
    clean(info, 0)
    assert f"memory: {total_kib * 1024 / 2**30:.1f} GiB of memory" in info.stdout


def _commands(group, path=()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_option_has_a_help_text():
    missing = [
        f"{' '.join(path)} {option.opts[0]}"
        for path, command in _commands(main)
        for option in command.params
        if isinstance(option, click.Option) and not option.help
    ]
    assert missing == []


def test_help_texts_name_what_each_option_takes():
    # the default dtype is float16 on any GPU (resolve.default_dtype), not only Metal's
    for path, command in _commands(main):
        dtype = next((p for p in command.params if p.name == "dtype"), None)
        if dtype is not None and dtype.default is None:
            assert "float16 on the GPU (Metal, CUDA)" in dtype.help, path
    # probe eval takes only a trained head, never best / last
    head = next(p for p in main.commands["probe"].commands["eval"].params if p.name == "head")
    assert "probe train" in head.help and "best" not in head.help


def test_the_command_line_imports_no_heavy_module_until_a_command_needs_it():
    """`aim-mlx --help` took 0.5 s, half of it importing the Core ML exporter (numpy, PIL, the
    model) for three lists of choices."""
    heavy = ["aim_mlx.export.coreml", "aim_mlx.models", "numpy", "PIL", "huggingface_hub"]
    code = f"import sys, aim_mlx.cli; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_notebook_gets_a_failed_commands_exit_status_back(model_dir, tmp_path, capsys):
    """main(..., standalone_mode=False) returns 1 where an image failed (was SystemExit), and
    the rows of the images that worked are printed."""
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    rocket = REF / "images" / "rocket.jpg"
    args = ["classify", str(rocket), str(tmp_path / "bad.jpg"), "-m", str(model_dir), "--json"]
    assert main([*args, "--no-progress"], standalone_mode=False) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [("error" in r, r["path"]) for r in rows] == [
        (False, str(rocket)),
        (True, str(tmp_path / "bad.jpg")),
    ]
