"""benchmarks/gpu_lane.sh and vs_pytorch_gpu.py in their smoke mode: the GPU lane's script runs
end to end here (tiny model, batch 2), so a call to the GPU machine does not fail on a typo."""

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from aim_mlx import runtime

ROOT = Path(__file__).parent.parent


def lane_env(out: Path, **settings: str) -> dict:
    """The environment of a smoke run of the lane writing to `out`: this process's, without the
    lane's own settings (a run inside the lane would pass them on), plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANE_")}
    env.update(OUT=str(out), LANE_SMOKE="1", PYTHON=sys.executable, **settings)
    return env


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_lane_smoke_writes_its_results(tmp_path):
    out = tmp_path / "out"
    # A stand-in nvidia-smi: the lane logs the card's clocks while the benchmark runs.
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\n"
        'case "$*" in *--query-gpu=*" -c 1"*)\n'
        '  echo "timestamp, clocks.current.sm [MHz]"; echo "2026/11/28 00:00:00.000, 1980 MHz";;\n'
        "*--query-gpu=*)\n"
        '  echo "timestamp, clocks.current.sm [MHz]"\n'
        '  while :; do echo "2026/11/28 00:00:00.000, 1980 MHz"; sleep 0.2; done;;\n'
        "esac\n"
        "echo 'stand-in GPU'\n"
    )
    fake.chmod(0o755)
    path = f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # LANE_BENCH_SECONDS: never cut short (on a busy machine the smoke run is slow)
    env = lane_env(out, PATH=path, LANE_BENCH_SECONDS="900")
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_lane.sh")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "mlx_version" in (out / "machine.txt").read_text()
    clocks = (out / "gpu_clocks.csv").read_text().splitlines()
    assert clocks[0].startswith("timestamp") and "1980 MHz" in clocks[1]

    profile = json.loads((out / "gpu_profile.json").read_text())
    for part in ("sustained", "data"):
        assert set(profile[part]) == {"random", "zeros"}, profile[part]
    assert all(v > 0 for v in profile["sustained"]["random"]["tflops"])
    assert profile["data"]["zeros"]["images_per_s"] > 0
    assert (out / "gpu_profile_clocks.csv").exists()  # the stand-in's log, started and stopped

    suite = ET.parse(out / "pytest.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) > 0 and suite.get("failures") == suite.get("errors") == "0"

    results = json.loads((out / "vs_pytorch_gpu.json").read_text())
    assert [(r["model"], r["batch"], r["dtype"]) for r in results["comparison"]] == [
        ("aim-tiny", 2, "bfloat16"),
        ("aim-tiny", 2, "float16"),
    ]
    for row in results["comparison"]:
        mlx = row["rounds"][0]["mlx"]
        assert mlx["images_per_s"] > 0 and mlx["peak_memory_gb"] >= mlx["weight_gb"] > 0
        assert row["summary"]["mlx_tflops"] > 0
        peak, fraction = results["meta"]["peak_tflops"], row["summary"]["mlx_fraction_of_peak"]
        if peak is None:  # a card without a spec sheet figure (the CPU here): none claimed
            assert fraction is None
        else:
            assert fraction == pytest.approx(row["summary"]["mlx_tflops"] / peak)
    # Each lever ran in its own process, with its own buffer setting.
    settings = {lever["lever"]: lever["result"]["buffer_setting"] for lever in results["levers"]}
    default = f"MLX_MAX_MB_PER_BUFFER={runtime.BUFFER_MB} (aim-mlx)"
    assert default in settings[next(iter(settings))]
    assert "MLX's default" in settings["MLX's own buffer limits"]
    assert "MLX_MAX_MB_PER_BUFFER=128 (user)" in settings["MLX_MAX_MB_PER_BUFFER=128"]
    table = (out / "vs_pytorch_gpu.md").read_text()
    assert "CUDA graphs off (MLX_USE_CUDA_GRAPHS=0)" in settings
    assert "mx.compile of the whole model" in settings
    assert "| aim-tiny (2) | bfloat16 |" in table and "| separate residual adds | 2 |" in table
    assert "| bfloat16 before: q, k and v by integer index" in table and "| GELU (MLX) |" in table


def test_peak_follows_the_cards_name():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from vs_pytorch_gpu import spec_peak

    assert spec_peak("NVIDIA H100 80GB HBM3 (CUDA, 79.2 GiB)") == (
        989.0,
        "H100 SXM bf16 dense peak, spec sheet",
    )
    assert spec_peak("NVIDIA H200 (CUDA, 139.8 GiB)")[0] == 989.0
    assert spec_peak("NVIDIA H100 PCIe (CUDA, 79.2 GiB)")[0] == 756.0
    assert spec_peak("NVIDIA H200 NVL (CUDA, 139.8 GiB)")[0] == 835.0
    assert spec_peak("NVIDIA A100-SXM4-80GB (CUDA, 79.2 GiB)")[0] is None


def test_trace_summary_splits_busy_time_from_idle_time():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_profile import summarize_trace

    def kernel(name, ts, dur):
        return {"cat": "kernel", "name": name, "ts": ts, "dur": dur}

    events = [
        {"cat": "user_annotation", "name": "mlx_forward_0", "ts": 0, "dur": 1000},
        kernel("nvjet_hsh_gemm", 100, 300),  # 100-400
        kernel("cudnn_fmha_fwd", 350, 100),  # overlaps: busy until 450
        kernel("gelu", 600, 200),  # idle 450-600
        kernel("gelu", 1200, 50),  # after the pass: not its
        {"cat": "user_annotation", "name": "torch_forward_0", "ts": 2000, "dur": 500},
        kernel("ampere_sgemm", 2100, 100),
    ]
    s = summarize_trace(events)
    (mlx,) = s["mlx"]["passes"]
    assert mlx["wall_ms"] == 1.0 and mlx["kernels"] == 3
    assert mlx["busy_ms"] == 0.55 and mlx["kernel_sum_ms"] == 0.6  # 100-450 and 600-800
    assert mlx["first_kernel_after_ms"] == 0.1
    assert mlx["by_kind_ms"] == {"attention": 0.1, "matmul": 0.3, "other": 0.2}
    assert s["mlx"]["top_kernels_ms_per_pass"][0] == ["nvjet_hsh_gemm", 0.3]
    (torch_pass,) = s["torch"]["passes"]
    assert torch_pass["by_kind_ms"] == {"matmul": 0.1}


def test_clock_log_is_read_and_matched_to_a_time_window(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_profile import clocks_during, read_clocks

    log = tmp_path / "clocks.csv"
    log.write_text(
        "timestamp, clocks.sm, clocks.mem, power.draw, power.limit, temperature.gpu, reasons\n"
        "2026/11/28 04:00:00.000, 1980, 2619, 120.5, 700.00, 38, 0x0000000000000000\n"
        "2026/11/28 04:00:01.000, 1500 MHz, 2619 MHz, 690.0 W, 700.00 W, 60, 0x0000000000000004\n"
        "2026/11/28 04:00:02.000, 1400, 2619, 700.0, 700.00, 61, 0x0000000000000004\n"
        "garbage line\n"
    )
    rows = read_clocks(log)
    assert [r["sm"] for r in rows] == [1980, 1500, 1400]
    t0 = rows[0]["t"]
    assert rows[2]["t"] - t0 == 2.0
    busy = clocks_during(rows, t0 + 0.5, t0 + 2.5)
    assert busy == {
        "samples": 2,
        "sm_mhz": 1450,
        "sm_mhz_min": 1400,
        "power_w": 695.0,
        "power_limit_w": 700.0,
        "reasons": ["0x0000000000000004"],
    }
    assert clocks_during(rows, t0 + 10, t0 + 11) == {}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_lane_bundle_packs_everything_beside_the_summaries(tmp_path):
    import tarfile

    out = tmp_path / "out"
    env = lane_env(out, LANE_PARTS="profile", LANE_BUNDLE="1")
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_lane.sh")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_profile.md",
        "lane-files.tar.gz",
        "machine.txt",
    ]
    with tarfile.open(out / "lane-files.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"gpu_profile.json", "gpu_profile.md", "profile.log", "machine.txt"} <= names
