"""Checksums of converted models: recorded by the converter as it writes (SHA256SUMS, config.json
included), checked again by `aim-mlx cache verify` (a flipped byte, a missing shard, an edited
config.json), and older entries (checksums in config.json's "files", or none) still served as
they are."""

import contextlib
import errno
import hashlib
import io
import json
import re
import shutil
import subprocess
import threading

import mlx.core as mx
import pytest
from conftest import REF, convert_fixture, exited_cleanly
from conftest import run_cli as cli

import aim_mlx
from aim_mlx import cache
from aim_mlx.convert import FORMAT_VERSION, checkpoint, converter
from aim_mlx.resolve import resolve

pytestmark = pytest.mark.usefixtures("pin_cpu", "private_cache")

KEY = "x--best--float32"


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """The fixture converted into shards of at most 600 kB (about 2 MB in all)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(converter, "SHARD_BYTES", 600_000)
        return convert_fixture(tmp_path_factory.mktemp("sharded") / "aim-tiny")


def entry(folder, key=KEY):
    """A copy of a converted folder as the cache entry `key`."""
    path = cache.entry_dir(key)
    shutil.copytree(folder, path)
    return path


def clean(result, code: int) -> str:
    """stdout, after `exited_cleanly`."""
    return exited_cleanly(result, code).stdout


def config_of(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def edit_config(folder, change) -> None:
    config = config_of(folder)
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


@contextlib.contextmanager
def held_elsewhere(key):
    """Entry `key`'s lock held on another thread (another FileLock, as another process's) until
    the block ends or the yielded event is set."""
    holding, done = threading.Event(), threading.Event()

    def hold():
        with cache.lock(key):
            holding.set()
            done.wait(timeout=30)

    other = threading.Thread(target=hold)
    other.start()
    try:
        assert holding.wait(timeout=30)
        yield done
    finally:
        done.set()
        other.join()


def old_style(folder):
    """`folder` as the aim-mlx before SHA256SUMS wrote it: the weights' sizes and SHA-256 in
    config.json's "files"; returns it."""
    (folder / "SHA256SUMS").unlink()
    weights = sorted(p for p in folder.iterdir() if p.name != "config.json")
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in weights}
    files = [{"file": p.name, "size": p.stat().st_size, "sha256": digest[p]} for p in weights]
    edit_config(folder, lambda c: (c.pop("checksums"), c.update(files=files)))
    return folder


def flip_byte(file, offset=None) -> None:
    data = bytearray(file.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))


# ---- What the converter records ----------------------------------------------------------


@pytest.mark.parametrize("layout", ["one file", "shards"])
def test_sha256sums_lists_every_file_the_conversion_wrote(layout, model_dir, sharded_dir):
    folder = model_dir if layout == "one file" else sharded_dir
    written = sorted(p.name for p in folder.iterdir() if p.name != "SHA256SUMS")
    assert "config.json" in written
    if layout == "shards":
        assert len(written) > 3 and "model.safetensors.index.json" in written
    expected = "".join(
        f"{hashlib.sha256((folder / name).read_bytes()).hexdigest()}  {name}\n" for name in written
    )
    assert (folder / "SHA256SUMS").read_text() == expected
    config = config_of(folder)
    assert config["checksums"] == "SHA256SUMS" and "files" not in config  # one record


@pytest.mark.skipif(not shutil.which("sha256sum"), reason="no sha256sum command on this machine")
@pytest.mark.parametrize("layout", ["one file", "shards"])
def test_sha256sum_checks_a_converted_folder(layout, model_dir, sharded_dir, tmp_path):
    folder = model_dir if layout == "one file" else sharded_dir
    run = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=folder, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    names = sorted(p.name for p in folder.iterdir() if p.name != "SHA256SUMS")
    assert run.stdout == "".join(f"{name}: OK\n" for name in names)
    copy = shutil.copytree(folder, tmp_path / "copy")
    flip_byte(copy / "config.json")
    assert subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=copy).returncode == 1


def test_an_entry_with_checksums_is_current_and_served_as_it_is(tmp_path):
    """The new record is no reason to convert again: `is_current` and a second use take it."""
    hub_style = tmp_path / "hf"
    shutil.copytree(REF / "hf_repo", hub_style)
    folder = resolve(hub_style, progress=False)
    assert (folder / "SHA256SUMS").is_file() and cache.is_current(folder)
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve(hub_style, progress=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == before


# ---- cache verify ------------------------------------------------------------------------


def test_verify_says_ok_for_an_intact_entry(model_dir, sharded_dir):
    entry(model_dir)
    entry(sharded_dir, "y--best--float32")
    out = clean(cli("cache", "verify", "--no-progress"), 0)
    assert out == f"ok           {KEY}\nok           y--best--float32\n"
    assert cache.verify(KEY).status == "ok"


def test_a_flipped_byte_is_named_and_fails(model_dir):
    path = entry(model_dir)
    flip_byte(path / "model.safetensors")
    out = clean(cli("cache", "verify", KEY), 1)
    assert out.startswith(f"damaged      {KEY}: model.safetensors: its SHA-256 differs")
    assert f"remove it (`aim-mlx cache rm {KEY}`): the next use converts it again" in out
    verdict = cache.verify(KEY)
    assert verdict.status == "damaged" and list(verdict.problems) == ["model.safetensors"]


@pytest.mark.parametrize(
    "field, value",
    [("num_heads", 4), ("img_size", 224), ("mlp_ratio", 4), ("probe_layers", [1, 2, 3, 4, 5, 6])],
)
def test_a_flipped_digit_in_config_json_is_named_and_fails(model_dir, field, value):
    """An edit that keeps config.json valid JSON (and the model loadable, for most of these)
    passed before config.json had a checksum."""
    path = entry(model_dir)
    assert config_of(path)[field] == value
    text = (path / "config.json").read_text()
    start = text.index(f'"{field}"')
    digit = re.compile(r"\d").search(text, start)
    flipped = {"4": "2", "2": "9", "1": "2"}[digit[0]]
    (path / "config.json").write_text(text[: digit.start()] + flipped + text[digit.end() :])
    assert config_of(path)[field] != value  # still JSON, another value
    out = clean(cli("cache", "verify", KEY), 1)
    assert out == (
        f"damaged      {KEY}: config.json: its SHA-256 differs from the one recorded when "
        f"converted; remove it (`aim-mlx cache rm {KEY}`): the next use converts it again\n"
    )
    assert cache.verify(KEY).problems == {
        "config.json": "its SHA-256 differs from the one recorded when converted"
    }


def test_a_removed_sha256sums_is_missing_and_fails(model_dir):
    """config.json names the file: its removal is not taken for an entry without checksums."""
    path = entry(model_dir)
    (path / "SHA256SUMS").unlink()
    out = clean(cli("cache", "verify", KEY), 1)
    assert out.startswith(f"missing      {KEY}: SHA256SUMS: missing; remove it")


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda text: "", "malformed: expected lines of a SHA-256 and a file name"),
        (lambda text: text + "hello\n", "malformed: expected lines of a SHA-256 and a file name"),
        (lambda text: text.replace("  config.json", "  ../config.json"), "malformed: expected"),
        (lambda text: text.splitlines()[0] + "\n", "does not list model.safetensors"),
        (lambda text: text.splitlines()[1] + "\n", "does not list config.json"),
        (lambda text: text.replace("config.json", "config.js\xf6n"), "does not list config.json"),
    ],
    ids=["empty", "a line more", "a path", "a line less", "first line lost", "not UTF-8"],
)
def test_a_damaged_or_shortened_sha256sums_is_damaged(model_dir, edit, problem):
    """A SHA256SUMS that lost a line would check less than the folder holds."""
    path = entry(model_dir)
    sums = path / "SHA256SUMS"
    sums.write_text(edit(sums.read_text()), encoding="latin-1")
    verdict = cache.verify(KEY)
    assert verdict.status == "damaged"
    assert list(verdict.problems) == ["SHA256SUMS"]
    assert verdict.problems["SHA256SUMS"].startswith(problem)


def test_a_flipped_byte_in_the_shard_list_is_found(sharded_dir):
    path = entry(sharded_dir)
    flip_byte(path / "model.safetensors.index.json", offset=40)
    assert list(cache.verify(KEY).problems) == ["model.safetensors.index.json"]


def test_a_file_of_another_size_is_damaged(model_dir):
    """An entry written before SHA256SUMS: its record in config.json has the sizes."""
    path = old_style(entry(model_dir))
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    verdict = cache.verify(KEY)
    size = weights.stat().st_size
    assert verdict.status == "damaged"
    assert verdict.problems == {"model.safetensors": f"{size} bytes, {size + 8} when converted"}


def test_a_missing_shard_is_named_and_fails(sharded_dir):
    path = entry(sharded_dir)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    out = clean(cli("cache", "verify", "--no-progress"), 1)
    assert out.startswith(f"missing      {KEY}: {shard.name}: missing; remove it")
    assert cache.verify(KEY).problems == {shard.name: "missing"}


def test_an_entry_with_checksums_in_config_json_is_verified_and_still_used(tmp_path, monkeypatch):
    """An entry of the aim-mlx before SHA256SUMS (the weights' checksums in config.json's
    "files"): verified through them, served as it is, never converted again for the new file."""
    hub_style = tmp_path / "hf"
    shutil.copytree(REF / "hf_repo", hub_style)
    folder = old_style(resolve(hub_style, progress=False))
    assert clean(cli("cache", "verify", folder.name), 0) == f"ok           {folder.name}\n"
    assert cache.is_current(folder)
    monkeypatch.setattr("aim_mlx.convert.convert", lambda *a, **k: pytest.fail("converted"))
    assert aim_mlx.load(hub_style, progress=False).args.num_blocks == 8
    assert not (folder / "SHA256SUMS").exists()
    flip_byte(folder / "model.safetensors")
    assert cache.verify(folder.name).problems == {
        "model.safetensors": "its SHA-256 differs from the one recorded when converted"
    }


def test_an_entry_without_checksums_is_reported_and_still_used(tmp_path, monkeypatch):
    """An entry made before any record existed: `verify` says how to get one (exit 0), and
    the entry is served as it is, never converted again for it."""
    hub_style = tmp_path / "hf"
    shutil.copytree(REF / "hf_repo", hub_style)
    folder = resolve(hub_style, progress=False)
    (folder / "SHA256SUMS").unlink()
    edit_config(folder, lambda c: c.pop("checksums"))
    out = clean(cli("cache", "verify", folder.name), 0)
    assert out == (
        f"no-checksums {folder.name}: made by an older aim-mlx, which recorded no checksums; "
        f"to have them, `aim-mlx cache rm {folder.name}` and use the model again\n"
    )
    assert cache.is_current(folder)
    monkeypatch.setattr("aim_mlx.convert.convert", lambda *a, **k: pytest.fail("converted"))
    assert aim_mlx.load(hub_style, progress=False).args.num_blocks == 8
    assert not (folder / "SHA256SUMS").exists()


def test_unknown_names_are_one_error_before_any_check(model_dir):
    entry(model_dir)
    result = cli("cache", "verify", KEY, "typo")
    assert clean(result, 1) == ""
    assert result.stderr == "Error: nothing cached under 'typo'; see `aim-mlx cache list`\n"


def test_a_converted_folder_outside_the_cache_is_verified(model_dir, tmp_path):
    """`aim-mlx convert -o` records the same checksums: verify takes the folder."""
    folder = tmp_path / "mine"
    shutil.copytree(model_dir, folder)
    assert clean(cli("cache", "verify", folder), 0) == f"ok           {folder}\n"
    flip_byte(folder / "model.safetensors")
    out = clean(cli("cache", "verify", folder), 1)
    assert out == (
        f"damaged      {folder}: model.safetensors: its SHA-256 differs from the one recorded "
        "when converted; convert it again (`aim-mlx convert ... --out FOLDER --force`)\n"
    )


def test_a_feature_set_is_not_a_model_to_verify(monkeypatch):
    monkeypatch.setattr(cache, "list_feature_sets", lambda: [type("E", (), {"key": "f1"})])
    result = cli("cache", "verify", "f1")
    assert clean(result, 1) == ""
    assert "'f1' is a feature set (probe train's cache); verify checks models" in result.stderr


def test_removing_an_entry_another_process_holds_says_why_it_waits(model_dir):
    entry(model_dir)
    with held_elsewhere(KEY) as done:
        threading.Timer(1.0, done.set).start()
        result = cli("cache", "rm", KEY)
    assert clean(result, 0).startswith(f"removed {KEY} (")
    assert f"waiting for another process using {KEY} (converting or verifying it)" in (
        result.stderr
    )


def test_a_model_name_verifies_its_entries(model_dir):
    entry(model_dir)
    entry(model_dir, "x--last--float32")
    entry(model_dir, "z--best--float32")
    out = clean(cli("cache", "verify", "X", "--no-progress"), 0)
    assert out.split() == ["ok", KEY, "ok", "x--last--float32"]


def test_json_is_one_object_per_entry_per_line(model_dir):
    entry(model_dir)
    flip_byte(entry(model_dir, "y--best--float32") / "model.safetensors")
    out = clean(cli("cache", "verify", "--json"), 1)
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows == [
        dict(key=KEY, path=str(cache.entry_dir(KEY)), status="ok", problems={}),
        dict(
            key="y--best--float32",
            path=str(cache.entry_dir("y--best--float32")),
            status="damaged",
            problems={
                "model.safetensors": "its SHA-256 differs from the one recorded when converted"
            },
        ),
    ]


def test_an_empty_cache_has_nothing_to_verify():
    out = clean(cli("cache", "verify"), 0)
    assert out == "nothing to verify: the cache holds no converted models\n"
    assert clean(cli("cache", "verify", "--json"), 0) == ""


def test_a_damaged_config_fails_and_a_newer_entry_is_left_alone(model_dir):
    (entry(model_dir) / "config.json").write_text("{")
    newer = entry(model_dir, "y--best--float32")
    edit_config(newer, lambda c: c.update(format_version=FORMAT_VERSION + 1))
    out = clean(cli("cache", "verify"), 1).splitlines()
    assert out[0].startswith(f"damaged      {KEY}: config.json: ")
    assert "not valid JSON" in out[0]
    assert out[1] == "newer        y--best--float32: made by a newer aim-mlx; not checked"


def test_an_entry_being_converted_is_busy_not_a_traceback(model_dir):
    entry(model_dir)
    with held_elsewhere(KEY):
        out = clean(cli("cache", "verify"), 0)
    assert out == (
        f"busy         {KEY}: another process is converting or removing it; "
        "verify it when that is done\n"
    )
    assert cache.verify(KEY).status == "ok"  # its lock released


def test_an_entry_removed_meanwhile_is_said_so(model_dir, monkeypatch):
    """Deleted while its files are read (by a process that takes no lock: `rm -r`)."""
    path = entry(model_dir)
    real = checkpoint.sha256_of

    def remove_first(file, on_read):
        shutil.rmtree(path)
        return real(file, on_read)

    monkeypatch.setattr(checkpoint, "sha256_of", remove_first)
    out = clean(cli("cache", "verify"), 0)
    assert out == f"removed      {KEY}: removed by another process meanwhile\n"


def test_a_failed_hash_is_raised_and_never_blocks_the_writer(tmp_path, monkeypatch):
    """A hashing thread that stopped on an error left `update` waiting on a full queue."""
    from aim_mlx.convert import safetensors_writer

    class Broken:
        def update(self, data):
            raise MemoryError("no room")

    monkeypatch.setattr(safetensors_writer.hashlib, "sha256", Broken)
    entries = [(f"t{i}", mx.float32, (4,)) for i in range(10)]
    writer = safetensors_writer.SafetensorsWriter(tmp_path / "w.safetensors", entries)

    def write_all():
        for name, _, _ in entries:  # more tensors than the queue holds
            writer.write(name, mx.zeros(4))

    worker = threading.Thread(target=write_all, daemon=True)  # a blocked one fails, never hangs
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the writer waits on the hashing thread's full queue"
    with pytest.raises(MemoryError, match="no room"):
        writer.close()


def test_a_full_disk_ends_the_hashing_thread(tmp_path, monkeypatch):
    """Closing the file fails too on a full disk (its buffer cannot be flushed): the thread was
    left waiting, holding the last tensor, at every failed conversion."""
    from aim_mlx.convert import safetensors_writer

    class FullDisk(io.BytesIO):
        def write(self, data):  # the header fits, nothing more
            if self.tell():
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_writer, "open", lambda *_: FullDisk(), raising=False)
    path, entries = tmp_path / "w.safetensors", [("t", mx.float32, (4,))]
    with (
        pytest.raises(OSError, match="No space left"),
        safetensors_writer.SafetensorsWriter(path, entries) as writer,
    ):
        writer.write("t", mx.zeros(4))
    assert not writer._hash._thread.is_alive()


def test_the_library_picks_entries_as_the_commands_do(model_dir, monkeypatch):
    """`cache.entries_named`, `to_remove` and `verify_named`: what `cache rm` and `cache verify`
    call, usable from Python."""
    keys = [KEY, "x--best--float32--q8g64", "x--last--float32", "z--best--float32"]
    assert cache.entries_named(["X"], keys) == keys[:3]  # a model name: all of its entries
    assert cache.entries_named(["X--BEST--FLOAT32"], keys) == [KEY]  # a key: that one only
    with pytest.raises(cache.CacheError, match="nothing cached under 'typo'"):
        cache.entries_named(["z", "typo"], keys)
    for key in (KEY, "z--best--float32"):
        entry(model_dir, key)
    monkeypatch.setattr(cache, "list_feature_sets", lambda: [type("E", (), {"key": "f1"})])
    assert cache.to_remove(["f1", "z"]) == (["z--best--float32"], ["f1"])
    assert cache.to_remove(remove_all=True) == ([KEY, "z--best--float32"], ["f1"])
    with pytest.raises(cache.CacheError, match="'f1' is a feature set"):
        cache.verify_named(["z", "f1"])  # refused before any check
    verdicts = list(cache.verify_named(["z", model_dir]))
    assert [(v.key, v.status, v.in_cache) for v in verdicts] == [
        ("z--best--float32", "ok", True),
        (str(model_dir), "ok", False),
    ]
