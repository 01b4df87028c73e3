"""pyproject's MLX backend choice: one backend per install, named by the extras on Linux."""

import re
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PLATFORMS = {
    "linux": {"sys_platform": "linux", "platform_system": "Linux"},
    "darwin": {"sys_platform": "darwin", "platform_system": "Darwin"},
}


def mlx_requirements(platform: str, extras: tuple = ()) -> set:
    """The MLX requirements an install of aim-mlx[extras] asks for: {"mlx", "mlx[cpu]", ...}."""
    env = {**default_environment(), **PLATFORMS[platform]}
    wanted = [(Requirement(r), "") for r in PROJECT["dependencies"]]
    for extra in extras:
        wanted += [(Requirement(r), extra) for r in PROJECT["optional-dependencies"][extra]]
    found = set()
    for req, extra in wanted:
        applies = req.marker is None or req.marker.evaluate({**env, "extra": extra})
        if req.name == "mlx" and applies:
            found.add("mlx" + (f"[{','.join(sorted(req.extras))}]" if req.extras else ""))
    return found


def test_linux_without_an_extra_installs_no_backend():
    # A second backend next to the one an extra names would overwrite the same library.
    assert mlx_requirements("linux") == {"mlx"}


@pytest.mark.parametrize(
    "extras, backend",
    [(("cpu",), "mlx[cpu]"), (("cuda",), "mlx[cuda13]"), (("cuda12",), "mlx[cuda12]")],
)
def test_linux_extra_names_exactly_one_backend(extras, backend):
    assert mlx_requirements("linux", extras) == {"mlx", backend}
    assert mlx_requirements("linux", (*extras, "test", "coreml")) == {"mlx", backend}


@pytest.mark.parametrize("extras", [(), ("cpu",), ("cuda",), ("cpu", "test", "coreml")])
def test_macos_gets_plain_mlx_whatever_the_extras(extras):
    assert mlx_requirements("darwin", extras) == {"mlx"}


def readme_commands() -> list:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line for block in blocks for line in block.splitlines() if "pip install" in line]


def test_readme_installs_name_a_backend():
    # Any quoting: on Linux an install without a backend's extra has no MLX that runs.
    local = [c for c in readme_commands() if re.search(r"pip install (-e )?[\"']?\.", c)]
    assert len(local) >= 2, local
    for command in local:
        extras = re.search(r"pip install (?:-e )?[\"']?\.\[([^\]]*)\]", command)
        assert extras and {"cpu", "cuda"} & set(extras.group(1).split(",")), command
    assert any('pip install "aim-mlx[cuda]"' in c or '".[cuda]"' in c for c in readme_commands())


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme_commands()
    assert "pytest" in ci and ".[cpu," in ci


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="installed backend on Linux")
def test_this_install_has_one_backend():
    from importlib.metadata import distributions

    names = {d.metadata["Name"].lower() for d in distributions()}
    backends = names & {"mlx-cpu", "mlx-cuda-12", "mlx-cuda-13", "mlx-cuda"}
    assert len(backends) <= 1, backends
