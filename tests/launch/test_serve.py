"""`ranker serve` as a real uvicorn process (1 and 2 workers), against the real Redis."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.service.helpers import load_features
from tests.support import ServerProcess


@pytest.mark.parametrize("workers", [1, 2])
def test_ranker_serve(model_repo: Path, redis_url: str, tmp_path: Path, workers: int,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    load_features(redis_url, model_repo / "mmoe" / "1")
    env = {"RANKER_WARMUP_BATCH_SIZES": "[1, 8]", "RANKER_REQUEST_TIMEOUT_S": "2.0"}
    # prometheus_client switches to multiprocess mode when the variable merely exists (even
    # empty: then it writes its files into the cwd), so it is set only for several workers
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    if workers > 1:
        (tmp_path / "prom").mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prom")
    flags = ["--model-repo", str(model_repo), "--model-name", "mmoe", "--redis-url", redis_url]
    server = ServerProcess(env, workers=workers, cli=True, extra_args=flags, ready_timeout_s=60.0,
                           stop_timeout_s=15.0)
    with server, httpx.Client(base_url=server.url, timeout=5.0) as client:
        for _ in range(6):  # several requests so that both workers likely serve some
            r = client.post("/rank", json={"user_id": "u2", "candidates": ["i1", "i2", "i3"],
                                           "preset": "engagement"})
            assert r.status_code == 200, r.text
            assert r.json()["model"]["version"] == 1 and len(r.json()["items"]) == 3
        r = client.post("/rank", json={"user_id": "u2", "candidates": []})
        assert r.status_code == 422
        text = client.get("/metrics").text
        ok = [ln for ln in text.splitlines()
              if ln.startswith('ranker_requests_total{route="/rank",status="200"}')]
        assert ok and float(ok[0].split()[-1]) == 6.0, ok  # summed over all workers
        assert 'ranker_model_info{name="mmoe",version="1"} 1.0' in text


def test_flags_win_over_env_and_reach_workers_only_through_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One worker gets the Settings object; several get the flags as RANKER_* variables."""
    from launch import serve
    from service.settings import Settings

    for var in ("RANKER_MODEL_REPO", "RANKER_MODEL_NAME", "RANKER_REDIS_URL",
                "RANKER_REDIS_FAILURE_MODE", "RANKER_MODEL_WATCH_INTERVAL_S",
                "RANKER_ORT_INTRA_OP_THREADS"):
        monkeypatch.delenv(var, raising=False)  # restored after the test, whatever serve sets
    monkeypatch.setenv("RANKER_MODEL_NAME", "from-env")
    monkeypatch.setenv("RANKER_ORT_INTRA_OP_THREADS", "0")
    args = serve.build_parser().parse_args(
        ["--model-repo", str(tmp_path), "--model-name", "from-flag", "--failure-mode", "degrade",
         "--watch-interval", "2.5", "--workers", "2"])
    overrides = serve.flag_overrides(args)
    settings = serve.settings_for(overrides, args.workers)
    assert settings.model_name == "from-flag" and settings.model_repo == tmp_path
    assert settings.redis_failure_mode == "degrade" and settings.model_watch_interval_s == 2.5
    assert settings.ort_intra_op_threads == serve.ort_threads_per_worker(os.cpu_count(), 2)
    serve.export_for_workers(settings, overrides)
    assert Settings() == settings  # what a worker's create_app_from_env reads
