"""MLX settings aim-mlx applies before mlx.core loads: each case runs in a fresh interpreter."""

import json
import os
import subprocess
import sys

import pytest

from aim_mlx import bench, runtime

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="set on Linux only")

# Records MLX_MAX_MB_PER_BUFFER at the moment mlx.core is first imported, then imports aim_mlx.
PROBE = """
import json, os, sys, warnings
seen = {}

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "mlx.core" and "at_import" not in seen:
            seen["at_import"] = os.environ.get("MLX_MAX_MB_PER_BUFFER")
        return None

sys.meta_path.insert(0, Watch())
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    if "early" in sys.argv:
        import mlx.core as mx
        mx.cuda.is_available = lambda: "fake-cuda" in sys.argv  # whatever this machine has
    import aim_mlx
    import mlx.core
    aim_mlx.runtime.setup()  # a second call does nothing
seen["after"] = os.environ.get("MLX_MAX_MB_PER_BUFFER")
seen["warnings"] = [str(w.message) for w in caught if "MLX_MAX_MB" in str(w.message)]
print(json.dumps(seen))
"""


def probe(*args: str, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in (runtime.BUFFER_ENV, runtime.OFF_ENV)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


@linux
def test_buffer_limit_is_set_before_mlx_loads():
    seen = probe()
    assert seen["at_import"] == seen["after"] == str(runtime.BUFFER_MB)
    assert seen["warnings"] == []


@linux
def test_users_own_buffer_limit_wins():
    seen = probe(MLX_MAX_MB_PER_BUFFER="64")
    assert seen["at_import"] == seen["after"] == "64"


@linux
def test_buffer_limit_off_keeps_mlx_defaults():
    seen = probe(AIM_MLX_BUFFER_LIMIT="off")
    assert seen["at_import"] is None and seen["after"] is None


@linux
def test_late_import_warns_only_where_cuda_reads_the_limit():
    on_cpu = probe("early")
    assert on_cpu["at_import"] is None and on_cpu["warnings"] == []
    on_cuda = probe("early", "fake-cuda")
    assert len(on_cuda["warnings"]) == 1
    assert "import aim_mlx first" in on_cuda["warnings"][0]


@linux
def test_mlx_without_a_backend_names_the_install_command(tmp_path):
    (tmp_path / "mlx").mkdir()
    (tmp_path / "mlx" / "__init__.py").write_text("")  # the bare `mlx` wheel: no lib/libmlx.so
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    out = subprocess.run([sys.executable, "-c", "import aim_mlx"], env=env, capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 1
    assert "without a backend" in out.stderr and 'pip install "aim-mlx[cpu]"' in out.stderr


@linux
def test_backend_whose_library_was_removed_says_how_to_put_it_back(tmp_path):
    # mlx-cpu and mlx-cuda-13 both install mlx/lib/libmlx.so: uninstalling one removes it.
    (tmp_path / "mlx").mkdir()
    (tmp_path / "mlx" / "__init__.py").write_text("")
    info = tmp_path / "mlx_cuda_13-0.32.4.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mlx-cuda-13\nVersion: 0.32.4\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    out = subprocess.run([sys.executable, "-c", "import aim_mlx"], env=env, capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 1
    assert "libmlx.so) is missing, though mlx-cuda-13 is installed" in out.stderr
    assert "pip install --force-reinstall --no-deps mlx-cuda-13" in out.stderr


@linux
def test_command_without_a_backend_says_so_in_one_line(tmp_path):
    # `pip install ".[coreml]"` alone on Linux: the `aim-mlx` script (as pip writes it) reports
    # the missing backend as one Error line, for any command, --help included.
    (tmp_path / "mlx").mkdir()
    (tmp_path / "mlx" / "__init__.py").write_text("")
    script = tmp_path / "aim-mlx"
    script.write_text("import sys\nfrom aim_mlx.cli import main\nsys.exit(main())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    for args in (["--help"], ["info"]):
        out = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True,
                             text=True)  # fmt: skip
        assert out.returncode == 1 and out.stdout == ""
        assert out.stderr.startswith("Error: MLX is installed without a backend")
        assert out.stderr.count("\n") == 1 and 'pip install "aim-mlx[cpu]"' in out.stderr


@pytest.mark.skipif(sys.platform != "darwin", reason="macOS only")
def test_metal_keeps_its_own_limits():
    assert probe()["after"] is None


def test_info_names_the_gpu(monkeypatch):
    import mlx.core as mx

    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    fake = {"device_name": "NVIDIA H100 80GB HBM3", "total_memory": 85 * 2**30}
    monkeypatch.setattr(mx, "device_info", lambda d=None: fake)
    assert bench.gpu() == "NVIDIA H100 80GB HBM3 (CUDA, 85.0 GiB)"
    env = bench.environment()
    assert env["gpu"] == bench.gpu()
    assert "command buffer" in env["gpu_runtime"] and "TF32" in env["gpu_runtime"]


def test_info_without_a_gpu(monkeypatch):
    import mlx.core as mx

    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    env = bench.environment()
    assert env["gpu"] is None and env["gpu_runtime"] is None
