"""The proofs' steps: serve, simulate, export the served log, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis

from ranker.servedlog import feedback_stream, served_stream
from sim.cli import main as simulate_main

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "e2e-admin"


def server_env(repo: Path, url: str, experiments: Path, **extra: str) -> dict[str, str]:
    env = {"RANKER_MODEL_REPO": str(repo), "RANKER_MODEL_NAME": "mmoe",
           "RANKER_MODEL_VERSION": "1", "RANKER_REDIS_URL": url,
           "RANKER_WARMUP_BATCH_SIZES": "[1, 64]", "RANKER_REQUEST_TIMEOUT_S": "5.0",
           "RANKER_EXPERIMENTS_FILE": str(experiments), "RANKER_EXPERIMENTS_POLL_S": "0.2",
           "RANKER_LOG_SAMPLE_RATE": "1", "RANKER_ADMIN_API_KEY": ADMIN}
    env.update(extra)
    return env


def simulate(base_url: str, world_dir: Path, out: Path, *args: str) -> dict[str, Any]:
    rc = simulate_main(["--base-url", base_url, "--data-dir", str(world_dir), "--json",
                        str(out), *args])
    assert rc == 0
    summary: dict[str, Any] = json.loads(out.read_text())
    return summary


def wait_logged(url: str, served: int, events: int, timeout_s: float = 60.0) -> None:
    """Until the served log holds `served` records and `events` feedback events."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        end = time.monotonic() + timeout_s
        while True:
            got = (client.xlen(served_stream("rk")), client.xlen(feedback_stream("rk")))
            if got[0] >= served and got[1] >= events:
                return
            assert time.monotonic() < end, f"served log holds {got}, want ({served}, {events})"
            time.sleep(0.1)
    finally:
        client.close()


def export_logs(url: str, out: Path) -> None:
    from launch.logs import export_main

    assert export_main(["--out", str(out), "--redis-url", url, "--until-empty"]) == 0


def report(logs: Path, out: Path, experiments: Path | None = None) -> dict[str, Any]:
    """`ranker experiment report` as a user runs it."""
    args = [sys.executable, "-m", "launch.cli", "experiment", "report", "--logs", str(logs),
            "--out", str(out), "--no-plot"]
    if experiments is not None:
        args += ["--experiments", str(experiments)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANKER_")}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = json.loads((out / "experiment_report.json").read_text())
    return result


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as r:
        body: dict[str, Any] = json.loads(r.read())
        return body


def metric_sum(base_url: str, name: str, **labels: str) -> float:
    """The sum over the series of `name` whose labels include `labels`, from /metrics."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=5) as r:
        text = r.read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total
