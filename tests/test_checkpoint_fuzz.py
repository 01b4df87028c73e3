"""Damaged checkpoints through the real `aim-mlx convert`: a clean success or one clean error.

Mutated copies of the reference checkpoints (truncated, bits flipped, runs spliced in from
elsewhere, runs zeroed, runs of zeros inserted; in the pickle record, in a data record, in the zip
structure around them or anywhere) are converted. Each conversion must either succeed with exactly
the weights of the undamaged files (the mutation hit bytes the reader never uses, such as zip
padding) or exit 1 with one `Error: ...` line; never a traceback, a signal, a hang or a leftover
output folder. The records' CRC-32s mean that no mutation of the bytes that are used may convert
into other weights.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from aim_mlx.cli import main

REF = Path(__file__).parent / "fixtures" / "reference"
FILES = {"head": "head_best_layers.pth", "backbone": "backbone.pth"}
KINDS = ("truncate", "flip", "splice", "zero", "insert")
REGIONS = ("pickle", "data", "zip", "anywhere")  # zip: headers, padding, central directory
SEEDS = range(3)
OPTIONS = ["--num-heads", "4", "--probe-layers", "1,2,3,4,5,6"]


def record_spans(data: bytes) -> dict[str, tuple[int, int]]:
    """Each zip record's (start, end) in the file, from the central and local headers."""
    spans = {}
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            local = data[info.header_offset : info.header_offset + 30]
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            spans[info.filename] = (start, start + info.compress_size)
    return spans


def mutate(data: bytes, kind: str, region: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    spans = record_spans(data)
    if region == "pickle":
        lo, hi = next(s for name, s in spans.items() if name.endswith("/data.pkl"))
    elif region == "data":
        records = sorted(s for name, s in spans.items() if "/data/" in name)
        lo, hi = records[rng.integers(len(records))]
    elif region == "zip":
        bounds = [0, *sorted(b for span in spans.values() for b in span), len(data)]
        gaps = [(a, b) for a, b in zip(bounds[::2], bounds[1::2], strict=True) if b > a]
        lo, hi = gaps[
            rng.choice(len(gaps), p=[(b - a) / sum(b - a for a, b in gaps) for a, b in gaps])
        ]
    else:
        lo, hi = 0, len(data)
    pos = int(rng.integers(lo, hi))
    run = int(rng.integers(1, 64))
    out = bytearray(data)
    if kind == "truncate":
        return bytes(out[:pos])
    if kind == "flip":
        for _ in range(int(rng.integers(1, 4))):
            out[int(rng.integers(lo, hi))] ^= 1 << int(rng.integers(8))
    elif kind == "splice":
        src = int(rng.integers(0, len(data) - run))
        out[pos : pos + run] = data[src : src + run]
    elif kind == "zero":
        out[pos : pos + run] = bytes(len(out[pos : pos + run]))
    elif kind == "insert":
        out[pos:pos] = bytes(run)
    return bytes(out)


def make_sources(folder: Path, damaged: str | None = None, damage=None) -> list[str]:
    """Copy both reference files into `folder`, one of them mutated; the CLI arguments."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part, name in FILES.items():
        data = (REF / name).read_bytes()
        (folder / name).write_bytes(mutate(data, *damage) if part == damaged else data)
        paths[part] = folder / name
    out = folder / "out"
    return ["convert", "--backbone", str(paths["backbone"]), "--head", str(paths["head"])] + [
        "--out",
        str(out),
        *OPTIONS,
    ]


def converted(out: Path) -> tuple[dict, dict]:
    config = json.loads((out / "config.json").read_text())
    config.pop("sources")  # the files' SHA-256s, which differ after any mutation
    return load_file(out / "model.safetensors"), config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    result = CliRunner().invoke(main, make_sources(folder))
    assert result.exit_code == 0, result.output
    return converted(folder / "out")


def check_outcome(folder: Path, code: int, stderr: str, reference):
    """Exit 0 with the reference weights, or exit 1 with one clean error line; nothing left."""
    assert "Traceback" not in stderr
    left = sorted(p.name for p in folder.iterdir())
    if code == 0:
        weights, config = converted(folder / "out")
        ref_weights, ref_config = reference
        assert config == ref_config
        assert weights.keys() == ref_weights.keys()
        for key, value in weights.items():
            assert value.dtype == ref_weights[key].dtype, key
            assert np.array_equal(value, ref_weights[key]), f"{key}: converted into other weights"
        assert left == sorted([*FILES.values(), "out"])
        return
    assert code == 1, f"exit status {code}: {stderr[-2000:]}"
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines()]
    errors = [line for line in lines if line.startswith("Error: ")]
    others = [line for line in lines if line and not line.startswith(("Error: ", "converting:"))]
    assert len(errors) == 1 and len(errors[0]) > len("Error: ") + 10, stderr
    assert not others, stderr
    assert left == sorted(FILES.values()), f"left behind: {left}"


CASES = [
    (part, kind, region, seed)
    for part in FILES
    for kind in KINDS
    for region in REGIONS
    for seed in SEEDS
]


@pytest.mark.parametrize("part, kind, region, seed", CASES)
def test_mutated_checkpoint_converts_cleanly_or_fails_cleanly(
    tmp_path, reference, part, kind, region, seed
):
    args = make_sources(tmp_path, part, (kind, region, seed))
    result = CliRunner().invoke(main, args, catch_exceptions=True)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    check_outcome(tmp_path, result.exit_code, result.stderr, reference)


@pytest.mark.parametrize(
    "part, kind, region, seed",
    [
        ("head", "insert", "data", 1),
        ("head", "flip", "pickle", 2),
        ("backbone", "truncate", "anywhere", 3),
        ("backbone", "flip", "data", 0),
        ("backbone", "splice", "anywhere", 5),
    ],
)
def test_mutated_checkpoint_in_a_real_process(tmp_path, reference, part, kind, region, seed):
    args = make_sources(tmp_path, part, (kind, region, seed))
    proc = subprocess.run(
        [sys.executable, "-c", "from aim_mlx.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}"
    check_outcome(tmp_path, proc.returncode, proc.stderr, reference)


def test_every_flip_in_a_used_record_is_caught(tmp_path):
    """The mutations that matter: a flip anywhere in the pickle or a tensor's bytes is an error
    naming the record, even where the pickle still parses and the tensor still has its shape."""
    data = (REF / FILES["backbone"]).read_bytes()
    spans = record_spans(data)
    used = {n: s for n, s in spans.items() if n.endswith("/data.pkl") or "/data/" in n}
    rng = np.random.default_rng(0)
    for name, (lo, hi) in sorted(used.items())[:12]:
        folder = tmp_path / name.replace("/", "_")
        shutil.rmtree(folder, ignore_errors=True)
        args = make_sources(folder)
        damaged = bytearray(data)
        damaged[int(rng.integers(lo, hi))] ^= 1 << int(rng.integers(8))
        (folder / FILES["backbone"]).write_bytes(bytes(damaged))
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, name
        path = folder / FILES["backbone"]
        assert result.stderr.rstrip().endswith(
            f"Error: {path}: record {name} is corrupted (CRC-32 mismatch); "
            "download or copy the file again"
        )
        assert sorted(p.name for p in folder.iterdir()) == sorted(FILES.values())
