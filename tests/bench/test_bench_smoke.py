"""Smoke run of `ranker bench --quick` on the tiny model: every piece runs, the report is whole.

No timing is asserted here (timing goals live in the benchmark report); this checks that the
harness starts and stops its processes, that every request succeeded, and that the report files
are produced and well-formed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import export_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[2]


def _process_groups() -> dict[int, int]:
    """pid -> process group id of every live process (from /proc)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(stat.parent.name)] = int(fields[2])
    return out


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One `ranker bench --quick` subprocess run on a freshly exported tiny model."""
    tmp = tmp_path_factory.mktemp("bench")
    version_dir = export_tiny_model(tmp / "models", name="mmoe")
    out_dir = tmp / "results"
    cmd = [sys.executable, "-m", "launch.cli", "bench", "--quick", "--model-dir",
           str(version_dir), "--data-dir", str(tmp / "no-data"), "--out-dir", str(out_dir),
           "--name", "smoke"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    paths = {p.suffix: p for p in map(Path, stdout.split())}
    assert set(paths) == {".json", ".md", ".png"}, stdout
    return paths


def test_writes_json_markdown_and_png(quick_report: dict[str, Path]) -> None:
    for path in quick_report.values():
        assert path.is_file() and path.stat().st_size > 0
    assert quick_report[".png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = quick_report[".md"].read_text()
    for heading in ("## Targets", "## Latency at concurrency 1", "## Stage breakdown",
                    "## Knobs", "Versions: python"):
        assert heading in md


def test_every_system_answered_without_errors(quick_report: dict[str, Path]) -> None:
    results = json.loads(quick_report[".json"].read_text())
    systems = {r["system"] for r in results["runs"]}
    assert systems == {"noop", "naive", "service"}
    for run in results["runs"]:
        assert run["ok"] > 0, run
        assert run["errors"] == {}, run
        assert run["ok"] >= run["sent"] - 1, run  # one may still be in flight at the end
        assert 0 < run["p50_ms"] <= run["p99_ms"]


def test_results_are_consistent(quick_report: dict[str, Path]) -> None:
    results = json.loads(quick_report[".json"].read_text())
    row = results["summary"]["per_n"]["100"]
    floors = row["mget_p50_ms"] + row["inference_p50_ms"] + row["noop_http_p50_ms"]
    assert row["floor_sum_ms"] == pytest.approx(floors)
    assert row["overhead_ratio"] == pytest.approx(row["service_p50_ms"] / floors)
    # same weights and an exact broadcast: the comparisons are between equal models
    assert results["eager_vs_onnx"]["batches_max_abs_diff"] < 1e-5
    assert results["user_once"]["100"]["max_abs_diff"] < 1e-5
    assert set(results["stages_metrics_ms"]) >= {"fetch", "inference", "serialize"}
    assert results["meta"]["versions"]["onnxruntime"] != "not installed"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_leaves_no_process_behind(quick_report: dict[str, Path]) -> None:
    results = json.loads(quick_report[".json"].read_text())
    started = {p["pid"] for p in results["processes"]}
    assert {p["name"].split("-")[0] for p in results["processes"]} >= {
        "noop", "naive", "service", "redis"}
    live = _process_groups()
    # each server led its own process group, so its uvicorn workers would share its pgid
    leftovers = {pid for pid, pgid in live.items() if pid in started or pgid in started}
    assert leftovers == set()
