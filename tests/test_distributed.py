"""classify / embed / eval under `mlx.launch`: two ranks over loopback (the ring backend) give what
one process gives, and a rank that fails ends the run quickly with nothing written."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import HALF_BOUND, REF
from safetensors import safe_open
from test_classify import LOGITS, cli, expected_top, imagenet_folder

from aim_mlx import distributed
from aim_mlx.errors import AimMlxError

pytestmark = pytest.mark.usefixtures("private_cache")


def tool(name: str) -> str:
    """A console script of this environment: beside the interpreter (a virtual environment), else
    on PATH (packages installed with `pip --target`, as on the GPU lane)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is neither beside {sys.executable} nor on PATH")
    return found


IMAGES = sorted((REF / "images").iterdir())

# Runs the command line, with a fault injected into rank 1 only (FAULT: model, raise, kill,
# vanish or hang).
FAULTY = """
import os, signal, sys, time
import aim_mlx.distributed
import aim_mlx.embed
from aim_mlx.cli import main

fault = os.environ["FAULT"] if os.environ.get("MLX_RANK") == "1" else None
if fault == "model":  # a model folder whose weights cannot be read
    sys.argv[sys.argv.index("--model") + 1] = os.environ["BROKEN_MODEL"]
if fault in ("raise", "kill"):  # an error, or the process killed, in its first batch
    def features(*args, **kwargs):
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("injected fault")
    aim_mlx.embed._features = features
if fault == "vanish":  # gone without an error status, before sending its rows
    aim_mlx.distributed.gather_rows = lambda *args: os._exit(0)
if fault == "hang":  # stuck while alive, in its first batch
    aim_mlx.embed._features = lambda *args, **kwargs: time.sleep(10**6)
sys.exit(main())
"""


def free_port_pair() -> int:
    """A port p with p and p + 1 free on loopback (the ring backend listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two adjacent free ports on 127.0.0.1")


def launch(*args, cwd: Path, env=None, script: Path | None = None) -> subprocess.CompletedProcess:
    """`mlx.launch -n 2 --backend ring` running aim-mlx (or `script`) with `args`, in `cwd`."""
    command = [str(script)] if script else [tool("aim-mlx")]
    return subprocess.run(
        [tool("mlx.launch"), "-n", "2", "--backend", "ring", "-p", str(free_port_pair()),
         "--python", sys.executable, *command, *map(str, args)],
        cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=90,
    )  # fmt: skip


def assert_same_rows(two: str, one: str):
    """The same rows in the same order: paths, errors, classes and labels exactly; the
    probabilities to float32 rounding (ranks may run their matmuls on other thread counts)."""
    rows = [[json.loads(line) for line in out.splitlines()] for out in (two, one)]
    assert len(rows[0]) == len(rows[1]) > 0, rows
    for got, want in zip(*rows, strict=True):
        strip = [{k: v for k, v in row.items() if k != "top_k"} for row in (got, want)]
        assert strip[0] == strip[1]
        tops = [[(t["index"], t["label"]) for t in row.get("top_k", [])] for row in (got, want)]
        assert tops[0] == tops[1]
        probs = [[t["prob"] for t in row.get("top_k", [])] for row in (got, want)]
        np.testing.assert_allclose(probs[0], probs[1], rtol=1e-5, atol=0)


@pytest.fixture()
def hub_folder(tmp_path, monkeypatch) -> str:
    """./hf, a folder of PyTorch checkpoints (the fixture model): each rank resolves it,
    converting it into the cache; tests run in tmp_path, like the ranks."""
    shutil.copytree(REF / "hf_repo", tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    return "hf"


def test_embed_two_ranks_equal_one_process(hub_folder, tmp_path):
    # Both ranks convert the same model into the same, empty cache at once: the lock serialises it.
    two = launch("embed", REF / "images", "-m", "hf", "-o", "two.safetensors", "-b", "3",
                 "--layers", "head", cwd=tmp_path)  # fmt: skip
    assert "rank 0/2: 2 images" in two.stderr and "rank 1/2: 2 images" in two.stderr, two.stderr
    assert two.stderr.count("wrote 4x64 features") == 1, two.stderr
    entries = os.listdir(tmp_path / "cache" / "models")
    assert len(entries) == 1, entries

    one = cli("embed", REF / "images", "-m", hub_folder, "-o", tmp_path / "one.safetensors")
    assert one.exit_code == 0, one.stderr
    rows = {}
    for name in ("one", "two"):
        with safe_open(tmp_path / f"{name}.safetensors", "np") as f:
            rows[name] = (f.get_tensor("features"), json.loads(f.metadata()["paths"]))
    assert rows["two"][1] == [str(p) for p in IMAGES] == rows["one"][1]
    assert rows["two"][0].dtype == np.float32 and rows["two"][0].shape == (4, 64)
    np.testing.assert_allclose(rows["two"][0], rows["one"][0], rtol=0, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["cache", "hf", "one.safetensors", "two.safetensors"]


def test_an_output_rank_0_refuses_stops_every_rank_at_once(hub_folder, tmp_path):
    """Rank 0 (the one that writes) finds the output exists: the other rank stops with the
    reason at once, instead of failing later on a vanished peer (with the ring's socket noise)."""
    (tmp_path / "out.npy").write_bytes(b"keep")
    two = launch("embed", *IMAGES, "-m", "hf", "-o", "out.npy", cwd=tmp_path)
    refused = "out.npy already exists; choose another output or pass --force"
    # (rank 0 says it too, unless the launcher stops it first, once rank 1 has exited)
    assert f"Error: rank 1/2: rank 0 stopped before any work: {refused}" in two.stderr, two.stderr
    assert "no answer from" not in two.stderr and "[ring]" not in two.stderr, two.stderr
    assert (tmp_path / "out.npy").read_bytes() == b"keep"


def test_classify_and_eval_two_ranks_equal_one_process(hub_folder, tmp_path):
    cli("classify", REF / "images", "-m", hub_folder, "-k", "3")  # converted once, here
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    inputs = [IMAGES[0], bad, *IMAGES[1:]]  # rank 0: an image and the bad one; rank 1: three
    two = launch("classify", *inputs, "-m", "hf", "--json", "-b", "2", cwd=tmp_path)
    one = cli("classify", *inputs, "-m", hub_folder, "--json", "-b", "2")
    assert one.exit_code == 1 and two.stdout.count("\n") == 5
    assert_same_rows(two.stdout, one.stdout)
    assert f'"path": "{bad}", "error"' in two.stdout  # every input has its row
    assert two.stderr.count(f"error: {bad}: not an image") == 1, two.stderr
    assert "rank 0/2: 1 image\n" in two.stderr and "rank 1/2: 3 images" in two.stderr

    # eval: camera and coffee in their top-1 class, chelsea in its second, rocket in its
    # 100th, and a copy of camera with rocket: 2 top-1 hits, 3 top-5 hits in 5 images.
    placement = {
        "camera.png": expected_top("camera.png")[0],
        "chelsea.png": expected_top("chelsea.png")[1],
        "coffee.png": expected_top("coffee.png")[0],
        "rocket.jpg": int(np.argsort(-LOGITS["rocket.jpg"])[99]),
    }
    data = imagenet_folder(tmp_path / "val", placement)
    shutil.copy(IMAGES[0], next(data.glob("*/rocket.jpg")).with_name("extra.png"))
    two = launch("eval", "--data-path", data, "-m", "hf", "--json", "-b", "2", cwd=tmp_path)
    one = cli("eval", "--data-path", data, "-m", hub_folder, "--json", "-b", "2")
    assert one.exit_code == 0 and json.loads(two.stdout) == json.loads(one.stdout), two.stderr
    on_gpu = mx.default_device() == mx.gpu  # where the fixture computes in float16
    assert json.loads(one.stdout) | {"failed": None} == {
        "model": "hf", "head": "best", "dtype": "float16" if on_gpu else "float32",
        "img_size": 224, "top1": 40.0,
        "top5": 60.0, "images": 5, "classes": 4, "failed": None,
    }  # fmt: skip
    assert "rank 0/2: 2 images" in two.stderr and "rank 1/2: 3 images" in two.stderr


@pytest.mark.parametrize("fault", ["model", "raise", "kill", "vanish", "hang"])
def test_a_failing_rank_fails_the_run_quickly_and_nothing_is_written(hub_folder, tmp_path, fault):
    cli("classify", IMAGES[0], "-m", hub_folder)  # converted once, here
    broken = tmp_path / "broken"
    shutil.copytree(next((tmp_path / "cache" / "models").iterdir()), broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 100)
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY)
    env = {"FAULT": fault, "BROKEN_MODEL": str(broken)}
    if fault == "hang":
        env[distributed.WAIT_ENV] = "3"  # how long rank 0, its share done, waits for rank 1

    start = time.monotonic()
    run = launch("embed", REF / "images", "--model", "hf", "-o", "out.npy", "-b", "1",
                 cwd=tmp_path, env=env, script=script)  # fmt: skip
    assert time.monotonic() - start < 60
    assert not list(tmp_path.glob("*out*")), os.listdir(tmp_path)
    # mlx.launch itself exits 0 whatever its ranks do; the messages name the failed rank.
    if fault == "model":
        assert "Error: rank 1/2: " in run.stderr and "broken" in run.stderr, run.stderr
    elif fault == "raise":
        assert "rank 1/2 failed during embed: RuntimeError: injected fault" in run.stderr
        assert "Traceback" in run.stderr  # rank 1 shows where its unexpected error came from
    elif fault == "kill":
        assert "Node with rank 1 exited with code -9" in run.stderr
    elif fault == "hang":  # rank 0 gives up waiting; the launcher then stops rank 1
        assert "Error: rank 0/2: the other ranks have not finished their shares 3 s" in run.stderr
        assert "Node with rank 0 exited with code 1" in run.stderr, run.stderr
    else:  # the launcher sees nothing wrong: rank 0 notices that rank 1's rows never came
        assert "Error: rank 0/2: no answer from rank 1/2 while gathering the results" in run.stderr
    assert "wrote" not in run.stderr


def test_peer_wait_setting(monkeypatch):
    monkeypatch.delenv(distributed.WAIT_ENV, raising=False)
    assert distributed.peer_wait() == 0.0  # automatic: from this rank's own share time
    for value, expected in (("90", 90.0), ("2.5", 2.5), ("off", None), (" OFF ", None)):
        monkeypatch.setenv(distributed.WAIT_ENV, value)
        assert distributed.peer_wait() == expected
    for bad in ("-1", "0", "soon", "nan", "inf", "1e300"):  # too long: the timer overflows
        monkeypatch.setenv(distributed.WAIT_ENV, bad)
        with pytest.raises(AimMlxError, match=f"{distributed.WAIT_ENV}=.*seconds above 0"):
            distributed.peer_wait()


def test_shares_are_even_contiguous_and_in_rank_order(monkeypatch):
    for world in (1, 2, 3, 5):
        monkeypatch.setattr(distributed, "size", lambda w=world: w)
        for n in (0, 1, 4, 7, 10):
            blocks = [distributed.share(n, r) for r in range(world)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_ranks_on_one_machine_share_its_cores(tmp_path, monkeypatch):
    hosts = [["127.0.0.1:5000"], ["127.0.0.1:5001"], ["10.0.0.2:5002"]]
    (tmp_path / "hosts.json").write_text(json.dumps(hosts))
    monkeypatch.setenv("MLX_HOSTFILE", str(tmp_path / "hosts.json"))
    assert [distributed._ranks_on_this_machine(r) for r in range(3)] == [2, 2, 1]
    monkeypatch.delenv("MLX_HOSTFILE")
    assert distributed._ranks_on_this_machine(0) == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4")
    assert distributed._ranks_on_this_machine(0) == 4

    from aim_mlx.models import cpu_runner

    monkeypatch.setattr(cpu_runner, "machine_cores", lambda: 10)
    for var in ("AIM_MLX_CPU_CORES", "AIM_MLX_CPU_STREAMS"):
        monkeypatch.setenv(var, "")  # so that the teardown restores them as they were: unset
        monkeypatch.delenv(var)
    distributed._share_cores(4)
    assert (os.environ["AIM_MLX_CPU_CORES"], os.environ["AIM_MLX_CPU_STREAMS"]) == ("2", "2")
    monkeypatch.setenv("AIM_MLX_CPU_CORES", "1")  # the user's settings win
    monkeypatch.delenv("AIM_MLX_CPU_STREAMS")
    distributed._share_cores(4)
    assert (os.environ["AIM_MLX_CPU_CORES"], os.environ["AIM_MLX_CPU_STREAMS"]) == ("1", "1")


def test_probe_train_two_ranks_extract_what_one_process_extracts(hub_folder, tmp_path, monkeypatch):
    from test_probe import draw_dataset

    data = draw_dataset(tmp_path / "data", per_class=4, size=32)  # 5 classes, 20 images
    args = ("probe", "train", data, "-m", "hf", "--epochs", "2", "--no-progress")
    two = launch(*args, "-o", "head2", cwd=tmp_path)
    assert "rank 0/2: 10 images" in two.stderr and "rank 1/2: 10 images" in two.stderr, two.stderr
    assert two.stderr.count("wrote head2") == 1 and (tmp_path / "head2" / "config.json").is_file()
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache1"))
    one = cli(*args, "-o", "head1")
    assert one.exit_code == 0, one.stderr

    def cached(cache: Path) -> dict:
        (folder,) = (cache / "features").iterdir()
        return {p.name: np.load(p) for p in folder.glob("*.npy")}

    ranks, alone = cached(tmp_path / "cache"), cached(tmp_path / "cache1")  # rank 0 wrote all
    assert sorted(ranks) == sorted(alone) and len(alone) == 20
    for name, features in alone.items():
        if mx.default_device() == mx.gpu:  # computed in float16, in batches made up differently
            diff = np.abs(ranks[name].astype(np.float32) - features.astype(np.float32)).max()
            assert diff < HALF_BOUND["float16"] * features.astype(np.float32).std(), name
        else:  # float32 values within 1e-5, rounded to float16
            np.testing.assert_allclose(ranks[name], features, rtol=2e-3, atol=1e-5)
    configs = [json.loads((tmp_path / h / "config.json").read_text()) for h in ("head2", "head1")]
    assert configs[0]["classes"] == configs[1]["classes"]
    assert configs[0]["training"]["train_images"] == configs[1]["training"]["train_images"]


def test_probe_eval_confusion_output_is_checked_by_rank_0_alone(hub_folder, tmp_path):
    """Rank 0 writes the confusion matrix: the other ranks neither check nor create its
    folder (on their machines), and stop with rank 0's reason when it refuses it."""
    from test_probe import draw_dataset

    data = draw_dataset(tmp_path / "data", per_class=2, size=32)
    trained = cli("probe", "train", data, "-m", "hf", "--epochs", "1", "-o", "head")
    assert trained.exit_code == 0, trained.stderr
    (tmp_path / "c.png").write_bytes(b"keep")
    two = launch("probe", "eval", data, "-m", "hf", "--head", "head", "--confusion", "c.png",
                 cwd=tmp_path)  # fmt: skip
    refused = "c.png already exists; choose another output or pass --force"
    assert f"Error: rank 1/2: rank 0 stopped before any work: {refused}" in two.stderr, two.stderr
    assert (tmp_path / "c.png").read_bytes() == b"keep"


def test_parts_that_did_not_come_are_all_named(monkeypatch):
    """Three ranks, rank 2 gone: rank 1 receives neither rank 2's part nor that of rank 0, which
    relays it (as seen under mlx.launch -n 3). The message names both, not rank 0 alone."""
    monkeypatch.setattr(distributed, "size", lambda: 3)
    monkeypatch.setattr(distributed, "rank", lambda: 1)

    def all_gather(sent, stream=None):  # rank 1's own part only; zeros for the others
        own = np.array(sent)
        return np.concatenate([np.zeros_like(own), own, np.zeros_like(own)])

    monkeypatch.setattr(mx.distributed, "all_gather", all_gather)
    with pytest.raises(distributed.DistributedError) as e, distributed._collective("gathering"):
        distributed.gather_json({"errors": {}})
    assert str(e.value).startswith("rank 1/3: no answer from rank 0/3 or rank 2/3 while gathering")


@pytest.mark.parametrize("into", [False, True])
def test_rank_0_gathers_the_rows_in_one_array(monkeypatch, into):
    """Rank 0 of two, in rounds of 2 rows: the other rank's 3 rows are written at their place,
    after rank 0's 2, into one array; given one (embed's output), rank 0's rows are there
    already and the result is that array: the rows are held once, not gathered then copied."""
    monkeypatch.setattr(distributed, "size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "GATHER_BYTES", 2 * 3 * 4)  # 2 rows of 3 float32
    theirs = np.arange(9, dtype=np.float32).reshape(3, 3) + 100
    rounds = []

    def all_gather(block):  # the other rank's next rows, padded as it pads them
        start = 2 * len(rounds)
        rounds.append(block.copy())
        other = np.zeros_like(block)
        other[: len(theirs[start : start + 2])] = theirs[start : start + 2]
        return [block, other]

    monkeypatch.setattr(distributed, "_all_gather", all_gather)
    mine = np.arange(6, dtype=np.float32).reshape(2, 3)
    array = np.full((6, 3), np.nan, np.float32)  # a row more than is gathered, as embed's
    if into:
        array[:2] = mine
    rows = distributed.gather_rows(array[:2] if into else mine, [2, 3], array if into else None)
    np.testing.assert_array_equal(rows, np.concatenate([mine, theirs]))
    assert len(rounds) == 2  # three rows in rounds of two
    assert np.shares_memory(rows, array) == into
    if into:
        assert np.isnan(array[5]).all()  # the row after them untouched


def test_an_input_missing_on_one_rank_only_is_named(monkeypatch):
    """Same paths, but one is missing on rank 1's machine: the message names it (it said "rank 1
    found 2 inputs and rank 0 2, or other paths")."""
    from aim_mlx.images import Item

    monkeypatch.setattr(distributed, "size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    sent = []

    def gather_json(record):  # rank 0's record (the first sent), then this one as rank 1's
        sent.append(record)
        return [sent[0], record]

    monkeypatch.setattr(distributed, "gather_json", gather_json)
    distributed.check_same_inputs([Item("a.png"), Item("b.png")], "embed")  # rank 0
    missing = [Item("a.png"), Item("b.png", "no such file or folder")]
    with pytest.raises(distributed.DistributedError) as e:
        distributed.check_same_inputs(missing, "embed")  # rank 1
    assert str(e.value).startswith(
        "rank 0/2: rank 1 found other inputs than rank 0 (rank 1: b.png: no such file or folder): "
        "every machine needs the same images at the same paths"
    )


ELSEWHERE = """
import os, sys
from aim_mlx.cli import main

if os.environ.get("MLX_RANK") == "1":  # another Mac, without the images
    os.chdir("elsewhere")
sys.exit(main())
"""


def test_a_rank_that_finds_none_of_the_images_is_named(tmp_path):
    """Rank 1 finds none of the inputs: it skipped the model and the comparison of the inputs
    (exit 0, no message), and rank 0 said only "no answer from rank 1/2 ... see its messages"."""
    shutil.copytree(REF / "images", tmp_path / "imgs")
    (tmp_path / "elsewhere").mkdir()
    script = tmp_path / "elsewhere.py"
    script.write_text(ELSEWHERE)
    model = tmp_path / "model"
    cli("convert", "--hf-path", REF / "hf_repo", "-o", model, "--no-progress")
    inputs = ["imgs/camera.png", "imgs/chelsea.png"]
    run = launch("classify", *inputs, "-m", model, "--json", cwd=tmp_path, script=script)
    missing = "rank 1 found other inputs than rank 0 (rank 1: imgs/camera.png: no such file"
    assert f"Error: rank 0/2: {missing}" in run.stderr, run.stderr
    assert "no answer from" not in run.stderr and run.stdout == ""


def test_bench_and_export_refuse_to_run_under_several_ranks(tmp_path):
    """Each rank would do the whole job: bench timed on shared cores (one row per rank), and
    export wrote one package twice (the second 'appeared while this command ran')."""
    for name, out in (("bench", []), ("export coreml", ["-o", "a.mlpackage"])):
        ran = launch(*name.split(), *out, "-m", "no-such-model", cwd=tmp_path)  # no download
        for r in (0, 1):
            said = f"Error: rank {r}/2: {name} runs in one process: start it without mlx.launch"
            assert said in ran.stderr, ran.stderr
