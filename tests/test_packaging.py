"""pyproject's MLX backend choice: one backend per install, named by the extras on Linux."""

import configparser
import os
import re
import shutil
import subprocess
import sys
import zipfile
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


# The wheel a user's `pip install ".[cpu]"` builds: its files, and the installed copy running
# outside this checkout (CI installs editable, which reads the source tree).
BUILD_SYSTEM = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
SETUPTOOLS = next(r for r in map(Requirement, BUILD_SYSTEM["requires"]) if r.name == "setuptools")
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
NOT_COPIED = {"build", "dist", "__pycache__"}


def test_test_extra_can_build_the_wheel():
    # `pip wheel --no-build-isolation` builds with the venv's setuptools: the test extra
    # brings it (a Python 3.12 venv has none, a 3.11 one too old a setuptools).
    test_extra = [Requirement(r) for r in PROJECT["optional-dependencies"]["test"]]
    assert any(r.name == "setuptools" and r.specifier == SETUPTOOLS.specifier for r in test_extra)


def _not_copied(folder, names):
    """The checkout's build leftovers, hidden folders (.git, caches, CI's .venv, .gpu) and
    virtual environments."""
    return [
        n
        for n in names
        if n in NOT_COPIED
        or n.startswith(".")
        or n.endswith(".egg-info")
        or (Path(folder, n) / "pyvenv.cfg").exists()
    ]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built offline from a copy of this checkout (a build in place would leave
    build/ and *.egg-info in it, and a stale build/ would go into later wheels)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("setuptools")
    except PackageNotFoundError:
        installed = None
    if installed is None or installed not in SETUPTOOLS.specifier:
        pytest.skip(f"building the wheel needs {SETUPTOOLS} (the test extra), found {installed}")
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "dist"
    shutil.copytree(ROOT, src, ignore=_not_copied)
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", out, src],
        check=True,
    )
    (built,) = out.glob("aim_mlx-*.whl")
    return built


def test_wheel_holds_the_package_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    package = {n for n in names if not n.startswith("aim_mlx-")}  # dist-info aside
    sources = {p for p in (ROOT / "aim_mlx").rglob("*.py") if "__pycache__" not in p.parts}
    data = {p for p in (ROOT / "aim_mlx" / "data").iterdir() if p.is_file()}
    expected = {p.relative_to(ROOT).as_posix() for p in sources | data}
    assert "aim_mlx/data/imagenet1k_classes.tsv" in expected
    assert package == expected  # every module and data file; no tests, benchmarks, fixtures
    assert not [n for n in names if n.split("/")[0] in {"tests", "benchmarks", "fixtures"}]

    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    config = configparser.ConfigParser()
    config.read_string(zipfile.ZipFile(wheel).read(entry_points).decode())
    assert dict(config["console_scripts"]) == {"aim-mlx": "aim_mlx.command:main"}
    assert dict(config["console_scripts"]) == PROJECT["scripts"]


def test_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(
        [*PIP, "install", "--no-deps", "--no-index", "--target", site, wheel], check=True
    )
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}

    def run(*args):
        done = subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    # The class list, read independently from the checkout's file.
    table = (ROOT / "aim_mlx" / "data" / "imagenet1k_classes.tsv").read_text("utf-8")
    names = [row.split("\t")[2] for row in table.splitlines()[1:]]
    code = (
        "import aim_mlx\nfrom aim_mlx.labels import imagenet_classes, label\n"
        "print(aim_mlx.__file__)\nprint(len(imagenet_classes()))\n"
        "print(label(0))\nprint(label(999))\nprint(aim_mlx.__version__)"
    )
    where, count, first, last, version = run(sys.executable, "-c", code)
    assert Path(where) == site / "aim_mlx" / "__init__.py"  # the installed copy, not this one
    assert (int(count), first, last) == (len(names), names[0], names[-1])
    assert version == PROJECT["version"]

    expected = [f"aim-mlx, version {PROJECT['version']}"]
    assert run(sys.executable, "-m", "aim_mlx.cli", "--version") == expected
    assert run(str(site / "bin" / "aim-mlx"), "--version") == expected  # the console script
