"""promtool on the deploy/ configs: syntax, rule syntax, and alert unit tests (no server needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.stack.helpers import PROM_CONFIG, rule_files

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian package `prometheus`; .ci/run installs it)",
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def test_promtool_check_config() -> None:
    done = _promtool("check", "config", str(PROM_CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_promtool_check_rules() -> None:
    done = _promtool("check", "rules", *map(str, rule_files()))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_alert_unit_tests() -> None:
    """Each alert fires on the input meant to trigger it and stays quiet on healthy input."""
    done = _promtool("test", "rules", str(Path(__file__).with_name("alerts_test.yml")))
    assert done.returncode == 0, done.stdout + done.stderr
