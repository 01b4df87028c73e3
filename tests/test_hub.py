"""Model name -> download -> checksum -> convert -> cache -> classify, against a local hub server.

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported, so the runs go through
the real `aim-mlx` command in a subprocess, as a user would run it.
"""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURE_CONFIG, REF, float32_bound, gpu_available
from hub_server import HubServer

from aim_mlx.convert import FORMAT_VERSION
from aim_mlx.probe.head import HEAD_FORMAT, HEAD_FORMAT_VERSION

REPO = "aim-test-org/AIM-tiny"
FILES = ["backbone.pth", "head_best_layers.pth", "head_last_layers.pth"]
LOGITS = np.load(REF / "logits_images_best.npz")
ENTRY = "aim-tiny--best--float32"
# The installed console script: beside this Python (a venv), else on PATH (a --target install).
AIM_MLX = Path(sys.executable).with_name("aim-mlx")
AIM_MLX = AIM_MLX if AIM_MLX.exists() else Path(shutil.which("aim-mlx") or AIM_MLX)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def registry_entry() -> dict:
    variants = FIXTURE_CONFIG["variants"]
    return {
        "name": "aim-tiny",
        "repo": REPO,
        "backbone": {"filename": "backbone.pth", "sha256": sha256(REF / "backbone.pth")[:8]},
        "heads": {
            v: {"filename": variants[v]["head"], "sha256": sha256(REF / variants[v]["head"])[:8]}
            for v in ("best", "last")
        },
        "probe_layers": {v: variants[v]["probe_layers"] for v in ("best", "last")},
        "arch": FIXTURE_CONFIG["config"],
    }


@pytest.fixture
def hub():
    server = HubServer({REPO: {f: REF / f for f in FILES}}).start()
    yield server
    server.stop()


@pytest.fixture
def env(tmp_path, hub):
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"models": [registry_entry()]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AIM_MLX_"))}
    env.pop("TRANSFORMERS_OFFLINE", None)
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf"),
        AIM_MLX_CACHE=str(tmp_path / "cache"),
        AIM_MLX_REGISTRY=str(registry),
    )
    return env


def aim_mlx(env, *args, offline=False, command=(sys.executable, "-m", "aim_mlx.cli")):
    """Run the CLI in a fresh process (optionally with HF_HUB_OFFLINE=1)."""
    env = {**env, "HF_HUB_OFFLINE": "1"} if offline else env
    return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=300)


def classify_json(env, *extra, **kw):
    args = ["classify", str(REF / "images"), "--model", "aim-tiny", "--json", "--dtype", "float32"]
    return aim_mlx(env, *args, *extra, **kw)


def assert_ranks_match_reference(stdout: str):
    """The top-5 of each image, as the reference ranks it; the CLI runs on MLX's default device
    (a GPU where there is one), so classes closer than that device's float32 bound may swap."""
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [Path(r["path"]).name for r in rows] == sorted(LOGITS.files)
    for row in rows:
        ref = LOGITS[Path(row["path"]).name]
        expected = np.argsort(-ref)[:5]
        got = [t["index"] for t in row["top_k"]]
        if not gpu_available():
            assert got == expected.tolist()
        tol = float32_bound(1e-4, gpu=True) * ref.std()
        np.testing.assert_allclose(ref[got], ref[expected], rtol=0, atol=tol)


def entry_config(env) -> dict:
    return json.loads((Path(env["AIM_MLX_CACHE"]) / "models" / ENTRY / "config.json").read_text())


def test_first_run_downloads_converts_caches_and_second_run_is_offline(env, hub):
    first = classify_json(env, command=[str(AIM_MLX)])  # the installed entry point, once
    assert first.returncode == 0, first.stderr
    assert_ranks_match_reference(first.stdout)
    # One download per file needed: the backbone and the best head, not the last head.
    assert len(hub.downloads("backbone.pth")) == 1
    assert len(hub.downloads("head_best_layers.pth")) == 1
    assert hub.downloads("head_last_layers.pth") == []
    assert entry_config(env)["format_version"] == FORMAT_VERSION
    assert entry_config(env)["probe_layers"] == FIXTURE_CONFIG["variants"]["best"]["probe_layers"]

    hub.requests.clear()
    second = classify_json(env, offline=True)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert hub.requests == []  # the converted cache was used: no network at all


def test_no_progress_on_a_terminal_shows_no_bar(env, hub):
    """--no-progress holds for huggingface_hub's download bars too (they left their lines on a
    terminal): a first run on a terminal with --no-progress writes nothing to stderr."""
    import pty

    master, terminal = pty.openpty()
    args = ["classify", str(REF / "images"), "-m", "aim-tiny", "--json", "--no-progress"]
    run = subprocess.Popen(
        [sys.executable, "-m", "aim_mlx.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal's other end closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert run.wait(timeout=300) == 0 and len(run.stdout.read().splitlines()) == len(LOGITS.files)
    assert shown == b""


def test_hub_bars_leave_the_process_as_they_found_it(monkeypatch):
    """hub_bars turns huggingface_hub's bars (global state) off off a terminal: blocks of two
    threads overlapping keep them off until the last ends, bars the user turned off stay off,
    and HF_HUB_DISABLE_PROGRESS_BARS=0 (bars forced on) is left alone, without a warning."""
    import warnings

    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled as off
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    from aim_mlx.hub import hub_bars

    try:
        first, second = hub_bars(False), hub_bars(False)  # as two threads' downloads overlap
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert off()  # the second download is still running
        second.__exit__(None, None, None)
        assert not off()

        disable_progress_bars()  # by the user: left off
        with hub_bars(False):
            assert off()
        assert off()
        enable_progress_bars()

        for module in (constants, sys.modules["huggingface_hub.utils.tqdm"]):  # read there
            monkeypatch.setattr(module, "HF_HUB_DISABLE_PROGRESS_BARS", False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with hub_bars(False):
                pass
    finally:
        enable_progress_bars()


def test_corrupted_file_is_refused_then_fetched_afresh(env, hub):
    hub.corrupt.add("head_best_layers.pth")
    bad = classify_json(env)
    assert bad.returncode == 1
    assert "checksum mismatch for head_best_layers.pth" in bad.stderr
    assert "Traceback" not in bad.stderr and bad.stdout == ""
    assert not (Path(env["AIM_MLX_CACHE"]) / "models" / ENTRY).exists()
    # The bad file left the download cache, so a run against a repaired hub fetches it again.
    hub.corrupt.clear()
    good = classify_json(env)
    assert good.returncode == 0, good.stderr
    assert_ranks_match_reference(good.stdout)
    assert len(hub.downloads("head_best_layers.pth")) == 2
    assert len(hub.downloads("backbone.pth")) == 1  # the good backbone was kept


def test_a_download_older_than_its_registry_entry_is_fetched_afresh(env, hub):
    """The model's file changed on the hub and in the registry (new SHA-256, same name) after
    it was downloaded: the cached copy is replaced in this run, not refused as a mismatch
    with 'run the command again'."""
    assert aim_mlx(env, "cache", "add", "aim-tiny", "--dtype", "float32").returncode == 0
    hub.repos[REPO]["head_best_layers.pth"] = REF / "head_last_layers.pth"
    entry = registry_entry()
    entry["heads"]["best"] = {**entry["heads"]["last"], "filename": "head_best_layers.pth"}
    entry["probe_layers"]["best"] = entry["probe_layers"]["last"]
    Path(env["AIM_MLX_REGISTRY"]).write_text(json.dumps({"models": [entry]}))
    result = aim_mlx(env, "cache", "add", "aim-tiny", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert "head_best_layers.pth: the cached copy does not match; downloading it" in result.stderr
    assert len(hub.downloads("head_best_layers.pth")) == 2
    assert len(hub.downloads("backbone.pth")) == 1
    assert entry_config(env)["sources"][1]["sha256"] == sha256(REF / "head_last_layers.pth")


def test_a_cached_copy_and_its_fresh_download_both_failing_is_the_hubs_file(env, hub):
    """Twice is not a damaged transfer: 'run the command again' would download it a third time."""
    assert aim_mlx(env, "cache", "add", "aim-tiny", "--dtype", "float32").returncode == 0
    assert aim_mlx(env, "cache", "rm", "aim-tiny").returncode == 0
    path = next(Path(env["HF_HOME"]).rglob("snapshots/*/head_best_layers.pth")).resolve()
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    hub.corrupt.add("head_best_layers.pth")
    result = aim_mlx(env, "cache", "add", "aim-tiny", "--dtype", "float32")
    assert result.returncode == 1 and len(hub.downloads("head_best_layers.pth")) == 2
    assert (
        "downloaded afresh, it differs again: the file on the hub is not the one" in result.stderr
    )
    assert "run the command again" not in result.stderr


def test_a_damaged_download_offline_says_to_fetch_it_online(env, hub):
    """HF_HUB_OFFLINE=1 and a cached file that fails its check: it is removed, and the advice
    is to run again online ('run the command again' offline only said it was not downloaded)."""
    assert aim_mlx(env, "cache", "add", "aim-tiny", "--dtype", "float32").returncode == 0
    assert aim_mlx(env, "cache", "rm", "aim-tiny").returncode == 0
    path = next(Path(env["HF_HOME"]).rglob("snapshots/*/head_best_layers.pth")).resolve()
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    result = aim_mlx(env, "cache", "add", "aim-tiny", "--dtype", "float32", offline=True)
    assert result.returncode == 1 and not path.exists()
    assert "run the command again, online (HF_HUB_OFFLINE is set), to download" in result.stderr


def test_interrupted_download_recovers(env, hub):
    size = (REF / "backbone.pth").stat().st_size
    hub.interrupt_once["backbone.pth"] = size // 2
    result = classify_json(env)
    assert result.returncode == 0, result.stderr
    assert_ranks_match_reference(result.stdout)
    assert len(hub.downloads("backbone.pth")) == 2


def test_a_download_reset_midway_is_tried_again(env, hub):
    """The connection reset (RST) half-way through the backbone: huggingface_hub does not resume
    that one itself; it was taken for a hub that cannot be reached, and the command ended with
    advice for working offline. It is tried again, and the run succeeds."""
    hub.reset_once["backbone.pth"] = (REF / "backbone.pth").stat().st_size // 2
    result = classify_json(env)
    assert result.returncode == 0, result.stderr
    assert_ranks_match_reference(result.stdout)
    assert len(hub.downloads("backbone.pth")) == 2
    assert "backbone.pth from aim-test-org/AIM-tiny: " in result.stderr
    assert "; trying again (2/3)" in result.stderr


# huggingface_hub writes what it received in 10 MB pieces, so a resume point exists only past
# 10 MB; the fixture backbone is 1.7 MB. This run lowers that piece size to 64 KB.
SMALL_CHUNKS = (
    sys.executable,
    "-c",
    "import sys, huggingface_hub.constants as c; c.DOWNLOAD_CHUNK_SIZE = 65536; "
    "from aim_mlx.cli import main; sys.argv[0] = 'aim-mlx'; main()",
)


def test_interrupted_download_resumes_where_it_stopped(env, hub):
    size = (REF / "backbone.pth").stat().st_size
    hub.interrupt_once["backbone.pth"] = cut = 10 * 65536 + 123
    result = classify_json(env, command=SMALL_CHUNKS)
    assert result.returncode == 0, result.stderr
    assert_ranks_match_reference(result.stdout)
    gets = hub.downloads("backbone.pth")
    assert [g.range for g in gets] == [None, f"bytes={cut // 65536 * 65536}-"]
    assert cut < size


@pytest.mark.parametrize("sent", [0, 300_000])
def test_a_stalled_download_ends_with_one_clear_error(env, hub, sent):
    """A hub that sends a file's headers (and `sent` bytes), then nothing, without closing the
    connection: huggingface_hub tries again itself (resuming while data comes) and gives up;
    aim-mlx does not start it all over twice more (18 requests, 3 min 20 s with the default
    timeout), and says what happened and what to do. The user's HF_HUB_DOWNLOAD_TIMEOUT holds."""
    hub.stall["backbone.pth"] = sent
    result = aim_mlx({**env, "HF_HUB_DOWNLOAD_TIMEOUT": "1"}, "cache", "add", "aim-tiny")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"the hub ({hub.url}) stopped sending, no data for 1 s" in result.stderr
    assert "HF_HUB_DOWNLOAD_TIMEOUT sets how many seconds" in result.stderr
    assert "trying again" not in result.stderr
    assert 1 < len(hub.downloads("backbone.pth")) < 10  # huggingface_hub's tries (6), once
    assert not (Path(env["AIM_MLX_CACHE"]) / "models" / ENTRY).exists()


def test_a_hub_that_stops_answering_for_one_file_ends_before_any_download(env, hub):
    """The hub answers for the backbone, then not at all for the head: said before the backbone
    is fetched, in HF_HUB_ETAG_TIMEOUT (the user's); huggingface_hub's download asks again with
    a timeout of its own (60 s, 6 times: 6 min and more) after fetching the backbone."""
    hub.stall["head_best_layers.pth"] = None
    result = aim_mlx({**env, "HF_HUB_ETAG_TIMEOUT": "1"}, "cache", "add", "aim-tiny")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    expected = f"({hub.url}) did not answer about head_best_layers.pth from {REPO} within 1 s"
    assert expected in result.stderr
    assert hub.downloads() == []
    asked = [r for r in hub.requests if r.path.endswith("/head_best_layers.pth")]
    assert len(asked) == 1


@pytest.mark.parametrize("sized", [False, True])
def test_file_missing_on_the_hub_is_not_retried(env, hub, sized):
    if sized:  # a registry entry that gives the sizes: the hub is asked all the same
        entry = registry_entry()
        for f in [entry["backbone"], *entry["heads"].values()]:
            f["size"] = (REF / f["filename"]).stat().st_size
        Path(env["AIM_MLX_REGISTRY"]).write_text(json.dumps({"models": [entry]}))
    del hub.repos[REPO]["head_last_layers.pth"]
    result = aim_mlx(env, "cache", "add", "aim-tiny", "--head", "last")
    assert result.returncode == 1
    assert "downloading head_last_layers.pth from aim-test-org/AIM-tiny failed" in result.stderr
    assert "trying again" not in result.stderr and "Traceback" not in result.stderr
    assert hub.downloads("head_last_layers.pth") == []  # 404 on the metadata request
    assert hub.downloads("backbone.pth") == []  # found before the backbone was fetched
    assert "answered HTTP 404. Check HF_ENDPOINT (a mirror may lack the file)" in result.stderr
    assert "\n\n" not in result.stderr  # one line, not the hub's paragraphs


def test_offline_without_cache_is_a_clear_error(env, hub):
    result = classify_json(env, offline=True)
    assert result.returncode == 1
    expected = (
        "aim-tiny needs backbone.pth, head_best_layers.pth from aim-test-org/AIM-tiny, "
        "not downloaded yet, and HF_HUB_OFFLINE is set"
    )
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert hub.requests == []


def test_input_mistakes_are_reported_before_any_download(env, hub, tmp_path):
    """Paths, folders and --layers that cannot work are said before the model is fetched: a
    typo costs no multi-GB download. The messages are those said after loading, before."""
    missing = tmp_path / "nope.jpg"
    empty = tmp_path / "empty"
    (empty / "not-a-wnid").mkdir(parents=True)
    head = tmp_path / "my-head"
    head.mkdir()
    trunk = dict(name="aim-tiny", sha256=sha256(REF / "backbone.pth"), num_blocks=8)
    config = dict(format=HEAD_FORMAT, format_version=HEAD_FORMAT_VERSION, classes=["cat", "dog"],
                  kind="linear", probe_layers=[1, 2], img_size=224, trunk=trunk)  # fmt: skip
    (head / "config.json").write_text(json.dumps(config))
    (empty / "bird").mkdir()
    features = tmp_path / "f.npy"
    model = ["--model", "aim-tiny"]

    runs = {
        "classify": aim_mlx(env, "classify", str(missing), *model, "--json"),
        "embed": aim_mlx(env, "embed", str(missing), "-o", str(features), *model),
        "layers": aim_mlx(
            env, "embed", str(REF / "images"), "-o", str(features), *model, "--layers", "3,99"
        ),
        "eval": aim_mlx(env, "eval", str(empty), *model),
        "probe": aim_mlx(env, "probe", "eval", str(empty), *model, "--head", str(head)),
    }
    assert hub.requests == []
    assert not (Path(env["AIM_MLX_CACHE"]) / "models").exists()
    assert not features.exists()
    for name, run in runs.items():
        assert run.returncode == (2 if name == "layers" else 1), (name, run.stderr)
        assert "Traceback" not in run.stderr
    assert json.loads(runs["classify"].stdout) == {
        "path": str(missing),
        "error": "no such file or folder",
    }
    assert runs["embed"].stderr.splitlines() == [
        f"error: {missing}: no such file or folder",
        "no features written: no image could be read",
    ]
    assert "blocks [99] do not exist: the model has 8 blocks" in runs["layers"].stderr
    assert "sub-folders must be ImageNet-1k WordNet ids like n01440764; not: bird, not-a-wnid" in (
        runs["eval"].stderr
    )
    assert "class sub-folder(s) ['bird', 'not-a-wnid'] are not classes of the head" in (
        runs["probe"].stderr
    )


def test_concurrent_first_runs_convert_once(env, hub):
    args = [sys.executable, "-m", "aim_mlx.cli", "cache", "add", "aim-tiny", "--dtype", "float32"]
    procs = [
        subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    entry = Path(env["AIM_MLX_CACHE"]) / "models" / ENTRY
    assert {out.strip() for out, _ in outs} == {str(entry)}
    assert sum(err.count("converting to float32") for _, err in outs) == 1
    assert len(hub.downloads("backbone.pth")) == 1
    assert sorted(p.name for p in entry.parent.iterdir()) == [ENTRY]  # no leftovers
    assert classify_json(env, offline=True).returncode == 0


@pytest.mark.parametrize("holder", ["entry lock", "rm-downloads"])
def test_a_process_waits_while_another_holds_the_entry_lock(
    env, hub, tmp_path, monkeypatch, holder
):
    """Another process converting the entry, or removing the model's downloads (`cache
    rm-downloads`: it holds every lock of the model, and the first conversion of an entry waits
    for it too): the conversion waits before downloading, then goes on."""
    from aim_mlx import cache
    from aim_mlx import hub as hub_module

    monkeypatch.setenv("AIM_MLX_CACHE", env["AIM_MLX_CACHE"])
    args = [sys.executable, "-m", "aim_mlx.cli", "cache", "add", "aim-tiny", "--dtype", "float32"]
    log = tmp_path / "stderr.txt"
    readers = hub_module.readers_folder("aim-tiny", Path(env["HF_HOME"]) / "hub")
    held = cache.lock(ENTRY) if holder == "entry lock" else cache.readers_held(readers)
    with held, open(log, "w") as stderr:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 60
        while "waiting for another process" not in log.read_text():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        time.sleep(0.5)
        assert proc.poll() is None and hub.downloads() == []  # blocked before downloading
    assert proc.wait(timeout=120) == 0
    assert entry_config(env)["format_version"] == FORMAT_VERSION


def test_older_format_entry_is_converted_again(env, hub):
    assert aim_mlx(env, "cache", "add", "aim-tiny", "--dtype", "float32").returncode == 0
    config_file = Path(env["AIM_MLX_CACHE"]) / "models" / ENTRY / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "format_version": FORMAT_VERSION - 1}))
    assert "old format" in aim_mlx(env, "cache", "list").stdout

    result = classify_json(env, offline=True)  # the downloads are still cached
    assert result.returncode == 0, result.stderr
    assert "converting to float32" in result.stderr
    assert entry_config(env)["format_version"] == FORMAT_VERSION
    assert_ranks_match_reference(result.stdout)


def test_a_newer_format_entry_is_neither_used_nor_replaced(env, hub):
    """Two aim-mlx versions sharing one cache converted an entry back and forth (each found the
    other's format stale); this one leaves a newer one's entry as it is, and says what to do."""
    assert aim_mlx(env, "cache", "add", "aim-tiny", "--dtype", "float32").returncode == 0
    config_file = Path(env["AIM_MLX_CACHE"]) / "models" / ENTRY / "config.json"
    newer = {**json.loads(config_file.read_text()), "format_version": FORMAT_VERSION + 1}
    config_file.write_text(json.dumps(newer))
    assert "(made by a newer aim-mlx: not used by this one)" in aim_mlx(env, "cache", "list").stdout
    listed = json.loads(aim_mlx(env, "cache", "list", "--json").stdout)["models"]
    assert [(m["current"], m["newer"]) for m in listed] == [(False, True)]

    result = classify_json(env, offline=True)
    assert result.returncode == 1 and "converting" not in result.stderr
    assert (
        f"{ENTRY}: made by a newer aim-mlx (format version {FORMAT_VERSION + 1}); upgrade"
        in result.stderr
    )
    assert f"(`aim-mlx cache rm {ENTRY}`) to convert it again with this one" in result.stderr
    assert entry_config(env) == newer  # untouched
    assert aim_mlx(env, "cache", "rm", ENTRY).returncode == 0
    assert classify_json(env, offline=True).returncode == 0
    assert entry_config(env)["format_version"] == FORMAT_VERSION


def test_drop_downloads_models_listing_and_cache_rm(env, hub):
    listing = json.loads(aim_mlx(env, "models", "--json").stdout)
    tiny = next(m for m in listing if m["name"] == "aim-tiny")
    assert not any(f["downloaded"] for f in tiny["files"]) and tiny["converted"] == []
    assert [m["name"] for m in listing[:4]] == ["aim-600M", "aim-1B", "aim-3B", "aim-7B"]

    add = aim_mlx(env, "cache", "add", "aim-tiny", "--dtype", "float32", "--drop-downloads")
    assert add.returncode == 0, add.stderr
    size = re.search(r"downloading .* \((.+)\) from", add.stderr).group(1)
    assert size.endswith(" MB") and f"removed {size} of downloaded" in add.stderr  # not 0.00 GB
    blobs = Path(env["HF_HOME"]) / "hub" / f"models--{REPO.replace('/', '--')}" / "blobs"
    assert list(blobs.iterdir()) == []  # raw checkpoints gone, converted model kept
    tiny = next(
        m for m in json.loads(aim_mlx(env, "models", "--json").stdout) if m["name"] == "aim-tiny"
    )
    assert not any(f["downloaded"] for f in tiny["files"])
    assert [c["key"] for c in tiny["converted"]] == [ENTRY]
    assert classify_json(env, offline=True).returncode == 0

    # Downloads kept by default, listed, then dropped on request.
    assert aim_mlx(env, "cache", "add", "aim-tiny", "--dtype", "float16").returncode == 0
    listed = aim_mlx(env, "cache", "list").stdout
    assert ENTRY in listed and "aim-tiny--best--float16" in listed and "MB" in listed
    assert "aim-tiny   backbone.pth" in listed and "head_best_layers.pth" in listed
    dropped = aim_mlx(env, "cache", "rm-downloads")
    assert dropped.returncode == 0 and "removed aim-tiny downloads" in dropped.stdout
    assert list(blobs.iterdir()) == [] and "backbone.pth" not in aim_mlx(env, "cache").stdout

    removed = aim_mlx(env, "cache", "rm", "aim-tiny")
    assert removed.returncode == 0 and f"removed {ENTRY}" in removed.stdout
    assert not (Path(env["AIM_MLX_CACHE"]) / "models" / ENTRY).exists()
    assert aim_mlx(env, "cache", "rm", "aim-tiny").returncode == 1  # nothing left to remove


def test_the_suite_downloads_from_its_local_hub_with_offline_mode_set_in_the_shell():
    """An HF_HUB_OFFLINE=1 in the shell that runs the tests leaves the local hub usable."""
    test = f"{__file__}::test_disk_space_is_checked_before_downloading"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-2000:]


def test_disk_space_is_checked_before_downloading(tmp_path, hub, monkeypatch):
    from aim_mlx import hub as hub_module
    from aim_mlx.registry import ModelSpec

    spec = ModelSpec.from_dict(registry_entry())
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(hub_module.shutil, "disk_usage", lambda p: usage._replace(free=1_000_000))
    with pytest.raises(hub_module.DiskSpaceError, match="not enough free disk space for aim-tiny"):
        hub_module.download(spec, "best", cache_dir=tmp_path / "hf", endpoint=hub.url)
    assert hub.downloads() == []
    monkeypatch.undo()
    paths = hub_module.download(spec, "best", cache_dir=tmp_path / "hf", endpoint=hub.url)
    assert [sha256(p) for p in paths] == [sha256(REF / f) for f in FILES[:2]]


def test_an_http_error_is_named_not_called_unreachable(env, hub):
    hub.status["backbone.pth"] = 404  # no X-Error-Code: e.g. an HF_ENDPOINT mirror without it
    result = aim_mlx(env, "cache", "add", "aim-tiny")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"the hub ({hub.url}) answered HTTP 404" in result.stderr
    assert "cannot be reached" not in result.stderr and "HF_HUB_OFFLINE" not in result.stderr


@pytest.mark.parametrize(
    "endpoint",
    ["http://127.0.0.1:99999", "127.0.0.1:8080", "ftp://hub", ""],  # "": MIRROR unset
)
def test_an_endpoint_that_is_no_http_address_is_one_error(env, endpoint):
    """A port out of range made importing huggingface_hub fail (a ValueError traceback, even
    for `cache list`); an address without http:// was tried three times as a network error."""
    env = {**env, "HF_ENDPOINT": endpoint}
    expected = "Error: HF_ENDPOINT must be the hub's address, like https://huggingface.co, got "
    out = str(Path(env["AIM_MLX_CACHE"]).parent / "out")
    convert = ["convert", "--hf-path", "me/AIM-hf", "-o", out]
    for args in (["cache", "add", "aim-tiny"], ["cache", "list"], ["models"], convert):
        result = aim_mlx(env, *args)
        assert result.returncode == 1 and result.stderr == f"{expected}{endpoint!r}\n", args
    assert "settings: invalid: HF_ENDPOINT must be" in aim_mlx(env, "info").stdout


def test_no_access_names_the_token(env, hub):
    hub.status["backbone.pth"] = 401
    result = aim_mlx(env, "cache", "add", "aim-tiny")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"the hub ({hub.url}) answered HTTP 401. Check HF_TOKEN" in result.stderr
    assert "trying again" not in result.stderr


def test_a_proxy_that_is_down_is_named(env, hub):
    """HTTP_PROXY naming a port where nothing listens: the connection is refused by the proxy,
    not by the hub (which is up); the message said 'cannot reach the hub' and stopped there."""
    with socket.socket() as s:  # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {k: v for k, v in env.items() if k.lower() not in ("no_proxy", "all_proxy")}
    result = aim_mlx({**env, "HTTP_PROXY": proxy}, "cache", "add", "aim-tiny")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"cannot reach the hub ({hub.url}) through the proxy {proxy} (HTTP_PROXY)" in (
        result.stderr
    )
    assert hub.requests == []


def test_a_gated_repo_says_to_accept_its_conditions(env, hub):
    """HTTP 403 with X-Error-Code GatedRepo: a valid token is not enough, the account must accept
    the repo's conditions first ('check HF_TOKEN' alone sent users after their token)."""
    hub.status["backbone.pth"] = 403
    hub.error_code["backbone.pth"] = "GatedRepo"
    result = aim_mlx(env, "cache", "add", "aim-tiny")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "answered HTTP 403. The repo is gated: accept its conditions on its page" in (
        result.stderr
    )
    assert hub.downloads() == []


def test_a_hub_that_never_answers_ends_quickly(monkeypatch):
    from huggingface_hub import constants

    from aim_mlx import hub as hub_module
    from aim_mlx.registry import ModelSpec

    spec = ModelSpec.from_dict(registry_entry())
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)  # the user's, as read at import
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(hub_module.HubError, match="did not answer about backbone.pth from"):
            hub_module.remote_size(spec, spec.backbone, endpoint)
    assert time.monotonic() - start < 5


def wait_until(condition, timeout=60):
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.05)


WAITING = "waiting for another process converting aim-tiny"


def rm_downloads_until_waiting(env, err_file):
    """`aim-mlx cache rm-downloads aim-tiny` started under `env` (stderr to `err_file`), once it
    says it waits, or has ended."""
    with open(err_file, "w") as err:
        rm = subprocess.Popen(
            [sys.executable, "-m", "aim_mlx.cli", "cache", "rm-downloads", "aim-tiny"],
            env=env, stdout=subprocess.PIPE, stderr=err, text=True,
        )  # fmt: skip
    try:
        wait_until(lambda: rm.poll() is not None or WAITING in err_file.read_text())
    except BaseException:  # nothing left running
        rm.kill()
        raise
    return rm


def test_rm_downloads_waits_for_a_conversion_reading_them(env, hub, tmp_path):
    """`cache rm-downloads` while another process has downloaded a model and is checking and
    converting it: it waits for that process (saying so), which then succeeds, and removes
    the files afterwards; not a FileNotFoundError in the middle of the other's work."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    script = f"""if True:
        import pathlib, sys, time
        from aim_mlx import hub
        verify = hub.verify
        def paused(*args, **kwargs):  # downloaded, not yet checked: wait for the test
            pathlib.Path({str(ready)!r}).touch()
            start = time.monotonic()
            while not pathlib.Path({str(go)!r}).exists() and time.monotonic() - start < 300:
                time.sleep(0.05)
            return verify(*args, **kwargs)
        hub.verify = paused
        from aim_mlx.cli import main
        sys.argv = ["aim-mlx", "cache", "add", "aim-tiny", "--dtype", "float32"]
        main()
    """
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    add = subprocess.Popen([sys.executable, "-c", script], env=env, **pipes)
    rm = None
    try:
        wait_until(lambda: ready.exists() or add.poll() is not None)
        assert ready.exists(), add.communicate()
        rm = rm_downloads_until_waiting(env, tmp_path / "rm.err")
        go.touch()
        add_out, add_err = add.communicate(timeout=120)
        rm_out, _ = rm.communicate(timeout=120)
    finally:  # a failed assertion leaves neither process running
        for proc in (add, rm):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert add.returncode == 0, add_err
    assert rm.returncode == 0 and "removed aim-tiny downloads" in rm_out
    assert WAITING in (tmp_path / "rm.err").read_text()
    res = classify_json(env, offline=True)  # the converted model needs no download
    assert res.returncode == 0, res.stderr
    assert_ranks_match_reference(res.stdout)


def test_rm_downloads_under_another_cache_waits_for_a_conversion(env, hub, tmp_path):
    """Two AIM_MLX_CACHE roots sharing one HF_HOME: `cache rm-downloads` under one waits (saying
    so) for a conversion under the other that reads the downloads, as it does within one root;
    it removed them at once, from under the conversion (the locks were in each AIM_MLX_CACHE)."""
    assert aim_mlx(env, "cache", "add", "aim-tiny", "--dtype", "float32").returncode == 0
    ready, go = tmp_path / "ready", tmp_path / "go"
    holder = f"""if True:  # a conversion reading aim-tiny's downloads, as resolve holds it
        import pathlib, time
        from aim_mlx import cache, hub
        with cache.lock("aim-tiny--last--float16", readers=hub.readers_folder("aim-tiny")):
            pathlib.Path({str(ready)!r}).touch()
            start = time.monotonic()
            while not pathlib.Path({str(go)!r}).exists() and time.monotonic() - start < 300:
                time.sleep(0.05)
    """
    converting = subprocess.Popen([sys.executable, "-c", holder], env=env)
    other = {**env, "AIM_MLX_CACHE": str(tmp_path / "other-cache")}
    rm = None
    try:
        wait_until(lambda: ready.exists() or converting.poll() is not None)
        rm = rm_downloads_until_waiting(other, tmp_path / "rm.err")
        assert rm.poll() is None and WAITING in (tmp_path / "rm.err").read_text()
        assert list(Path(env["HF_HOME"]).rglob("snapshots/*/backbone.pth"))  # not removed yet
        go.touch()
        rm_out, _ = rm.communicate(timeout=120)
    finally:  # a failed assertion leaves neither process running
        go.touch()
        for proc in (converting, rm):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert converting.wait(timeout=60) == 0
    assert rm.returncode == 0 and "removed aim-tiny downloads" in rm_out
    assert not list(Path(env["HF_HOME"]).rglob("snapshots/*/backbone.pth"))


def test_rm_downloads_with_nothing_downloaded_makes_no_download_cache(env):
    """The locks shared through the download cache are not made where there is none yet."""
    result = aim_mlx(env, "cache", "rm-downloads")
    assert result.returncode == 0 and "nothing to remove" in result.stdout
    assert not Path(env["HF_HOME"]).exists()


def test_a_download_removed_before_its_check_is_one_error(tmp_path):
    """`cache rm-downloads` under another AIM_MLX_CACHE (whose locks this process does not
    see) removed a file between its download and its check: a HubError, not a traceback."""
    from aim_mlx import hub as hub_module
    from aim_mlx.registry import ModelSpec

    spec = ModelSpec.from_dict(registry_entry())
    with pytest.raises(hub_module.HubError, match="backbone.pth from .* was removed from the"):
        hub_module.verify(spec, spec.backbone, tmp_path / "gone" / "backbone.pth")


def test_a_download_failure_is_one_line_without_python_api_advice(tmp_path, monkeypatch, capsys):
    """huggingface_hub's size check after a download says "Please retry with
    `force_download=True`" on a second line: advice for its Python API, not for a CLI user."""
    import huggingface_hub

    from aim_mlx import hub as hub_module
    from aim_mlx.registry import ModelSpec

    def inconsistent(*args, **kwargs):
        raise OSError(
            "Consistency check failed: file should be of size 11 but has size 10 (backbone.pth)."
            "\nThis is usually due to network issues while downloading the file. Please retry "
            "with `force_download=True`."
        )

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", inconsistent)
    monkeypatch.setattr(hub_module.time, "sleep", lambda s: None)
    spec = ModelSpec.from_dict(registry_entry())
    with pytest.raises(hub_module.HubError) as e:
        hub_module.fetch(spec, spec.backbone, cache_dir=tmp_path)
    assert str(e.value) == (
        "downloading backbone.pth from aim-test-org/AIM-tiny failed: Consistency check failed: "
        "file should be of size 11 but has size 10 (backbone.pth)."
    )
    assert "force_download" not in capsys.readouterr().err


def test_readers_held_says_it_waits_whichever_conversion_is_busy(tmp_path, monkeypatch):
    """Another process converting the model's second entry (not the first, in sorted order):
    the removal of the downloads still says it waits, once, then holds every lock."""
    import threading

    from aim_mlx import cache

    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    readers = tmp_path / "hf" / ".locks" / "aim-mlx" / "aim-tiny"
    keys = [cache.entry_key("aim-tiny", "best", dtype) for dtype in ("float16", "float32")]
    for key in keys:
        with cache.lock(key, readers=readers):  # its lock file stays, as after a conversion
            pass
    said, holding = threading.Event(), threading.Event()

    def convert_second():  # another FileLock, as another process's
        with cache.lock(keys[1], readers=readers):
            holding.set()
            said.wait(timeout=60)

    other = threading.Thread(target=convert_second)
    other.start()
    assert holding.wait(timeout=60)
    calls = []
    with cache.readers_held(readers, on_wait=lambda: (calls.append(1), said.set())):
        assert calls == [1] and said.is_set()
    other.join()


def test_readers_held_passes_over_a_lock_it_cannot_open(tmp_path, monkeypatch):
    """A reader's lock that cannot be opened here (a read-only download cache, where its locks
    were made while it was writable, or another account's lock file; here a folder in its place)
    is not waited for: `cache rm-downloads` ended in a traceback. The others are still held."""
    import concurrent.futures

    from filelock import FileLock, Timeout

    from aim_mlx import cache

    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    readers = tmp_path / "hf" / ".locks" / "aim-mlx" / "aim-tiny"
    with cache.lock("aim-tiny--best--float32", readers=readers):  # its lock file stays
        pass
    (readers / "0--aim-tiny--best--float16.lock").mkdir()  # sorted first: cannot be opened
    (reader,) = [p for p in readers.iterdir() if p.is_file()]

    def try_reader():  # another thread: another FileLock, as another process's
        try:
            FileLock(reader).acquire(timeout=0)
        except Timeout:
            return "held"
        return "free"

    with cache.readers_held(readers), concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert pool.submit(try_reader).result(timeout=30) == "held"


def test_conversion_starting_during_rm_downloads_waits_for_it(tmp_path, monkeypatch):
    """A conversion of a model entry never made before (so no lock file of it was listed) that
    starts while `cache rm-downloads` holds the model's locks waits, saying so, until the
    removal is done, instead of reading the downloads that are being removed."""
    import threading

    from aim_mlx import cache

    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    readers = tmp_path / "hf" / ".locks" / "aim-mlx" / "aim-tiny"
    removed, converting, waited = threading.Event(), threading.Event(), threading.Event()
    removed_before = []
    key = cache.entry_key("aim-tiny", "last", "bfloat16")

    def convert_new_entry():  # another FileLock, as another process's
        with cache.lock(key, on_wait=waited.set, readers=readers):
            removed_before.append(removed.is_set())  # it reads no download being removed
            converting.set()

    with cache.readers_held(readers):
        other = threading.Thread(target=convert_new_entry)
        other.start()
        assert waited.wait(timeout=10)  # blocked on the gate, saying so
        assert not converting.is_set()
        removed.set()
    other.join(timeout=10)
    assert converting.is_set() and removed_before == [True]
    # and the next removal sees the new conversion's lock file (and would wait for it)
    assert [p.name.split("--", 1)[1] for p in readers.glob("*.lock")] == [f"{key}.lock"]


def test_a_conversion_waiting_on_both_locks_says_so_once(tmp_path, monkeypatch):
    """Waiting for a removal of the model's downloads, then for another process converting the
    same entry: one "waiting" line, not two."""
    import threading

    from filelock import FileLock

    from aim_mlx import cache

    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    readers = tmp_path / "hf" / ".locks" / "aim-mlx" / "aim-tiny"
    readers.mkdir(parents=True)
    key = cache.entry_key("aim-tiny", "best", "float16")
    gate = FileLock(cache._gate(readers))  # other processes' locks
    (tmp_path / "cache" / ".locks").mkdir(parents=True)
    entry = FileLock(tmp_path / "cache" / ".locks" / f"{key}.lock")
    gate.acquire()
    entry.acquire()
    said, held = [], threading.Event()

    def convert():
        with cache.lock(key, on_wait=lambda: said.append(1), readers=readers):
            held.set()

    other = threading.Thread(target=convert)
    other.start()
    for release in (gate, entry):  # the removal ends first, then the other conversion
        deadline = time.monotonic() + 10
        while not said and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        release.release()
    other.join(timeout=10)
    assert held.is_set() and said == [1]


def test_rm_downloads_removes_what_killed_downloads_left(tmp_path, monkeypatch):
    from aim_mlx import hub as hub_module
    from aim_mlx.registry import ModelSpec

    spec = ModelSpec.from_dict(registry_entry())
    blobs = tmp_path / "hf" / f"models--{spec.repo.replace('/', '--')}" / "blobs"
    blobs.mkdir(parents=True)
    killed, active = blobs / "aa.1234abcd.incomplete", blobs / "aa.5678abcd.incomplete"
    killed.write_bytes(b"x" * 1000)
    active.write_bytes(b"y" * 10)  # being written now, by another process
    old = time.time() - 3600
    os.utime(killed, (old, old))
    assert hub_module.remove_downloads(spec, tmp_path / "hf") == 1000
    assert not killed.exists() and active.exists()


def test_quantized_models_need_less_disk(tmp_path, hub, monkeypatch):
    from aim_mlx import cache, registry, resolve
    from aim_mlx import hub as hub_module

    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    asked = []
    monkeypatch.setattr(hub_module, "check_disk_space", lambda needs, what: asked.append(needs))
    spec = registry.register(registry_entry(), replace=True)
    try:
        for bits in (None, 4):
            resolve.resolve("aim-tiny", dtype="float16", quantize_bits=bits, endpoint=hub.url,
                            hf_cache_dir=tmp_path / "hf", progress=False)  # fmt: skip
    finally:
        registry._registered.pop(spec.name)
    params = spec.param_count()
    converted = [needs[cache.cache_root()] for needs in asked]
    assert converted[0] == 2 * params  # float16
    assert converted[1] == int(params * (4 / 8 + 2 * 2 / 64))  # packed, a scale and a bias / 64


def test_convert_from_a_hub_repo_id(tmp_path):
    """`aim-mlx convert --hf-path org/name` downloads config.json and the weights, then converts."""
    repo = "aim-test-org/AIM-tiny-hf"
    hf = REF / "hf_repo"
    server = HubServer({repo: {f: hf / f for f in ("config.json", "pytorch_model.bin")}}).start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"))
        out = tmp_path / "converted"
        run = aim_mlx(env, "convert", "--hf-path", repo, "--out", str(out))
        assert run.returncode == 0, run.stderr
        # Bars only on a terminal: not huggingface_hub's "Fetching 2 files" either.
        assert "Fetching" not in run.stderr and "it/s" not in run.stderr, run.stderr
        config = json.loads((out / "config.json").read_text())
        assert config["probe_layers"] == [1, 2, 3, 4, 5, 6] and config["num_heads"] == 4
        assert [s["file"] for s in config["sources"]] == ["pytorch_model.bin"]
        assert len(server.downloads("pytorch_model.bin")) == 1
    finally:
        server.stop()


def test_a_download_that_cannot_be_removed_is_one_error(tmp_path, monkeypatch):
    """A read-only download cache (or another account's files): `cache rm-downloads` ended in a
    traceback of the unlink."""
    import errno

    from aim_mlx import hub as hub_module

    blob = tmp_path / "blobs" / "abc"
    blob.parent.mkdir()
    blob.write_bytes(b"x" * 10)
    link = tmp_path / "snapshots" / "rev" / "backbone.pth"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(hub_module.HubError, match=r"cannot remove .* \(Read-only file system\)"):
        hub_module.remove_cached_file(link)


def test_a_token_that_is_not_ascii_is_named(env, hub):
    """A header value HTTP cannot carry (a token pasted with a typographic quote): one line
    naming HF_TOKEN, not the HTTP client's UnicodeEncodeError."""
    result = aim_mlx({**env, "HF_TOKEN": "hf_\u2019abc"}, "cache", "add", "aim-tiny")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "a request header holds a character that is not ASCII; check HF_TOKEN" in result.stderr
    assert "trying again" not in result.stderr and hub.downloads() == []
