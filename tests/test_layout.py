"""The import contracts in pyproject.toml hold, and they would catch the layering they forbid."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ranker", "service", "training", "launch", "bench", "sim", "tests")
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent))


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    assert LINT is not None
    return subprocess.run([LINT, "--no-cache"], cwd=root, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter not installed (dev extra)")


def test_contracts_hold() -> None:
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(("module", "line", "names"), [
    ("service/app.py", "import training.model", "service"),
    ("training/train.py", "import service.app", "training"),
    ("service/pipeline.py", "import launch.cli", "service"),
    ("ranker/schema.py", "import tests.tiny", "ranker"),
    ("training/model.py", "import launch.procs", "training"),
    ("service/ranking.py", "import torch", "torch"),
])
def test_a_forbidden_import_breaks_a_contract(tmp_path: Path, module: str, line: str,
                                              names: str) -> None:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # injected\n")
    out = lint(tmp_path)
    assert out.returncode != 0, out.stdout
    assert "BROKEN" in out.stdout and names in out.stdout, out.stdout
