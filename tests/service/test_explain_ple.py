"""A PLE model with the click -> like/share chain, served by the real app: explain returns the
last level's task gates, the chained scores never exceed p(click), the gate-health gauge moves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ranker.manifest import GATES_LEVELS_OUTPUT, load_manifest
from tests.service.helpers import load_features, metric, running_app
from tests.support import settings_for
from tests.tiny import MODEL_NAME, TASKS, export_tiny_model

pytestmark = pytest.mark.asyncio


async def test_ple_explain_and_chain(tmp_path: Path, redis_url: str) -> None:
    repo = tmp_path / "models"
    version = export_tiny_model(repo, name=MODEL_NAME, model_type="ple", levels=2,
                                task_experts=2, shared_experts=3,
                                chain={"like": "click", "share": "click"})
    manifest = load_manifest(version)
    assert manifest.model_type == "ple" and manifest.n_experts == 5
    assert GATES_LEVELS_OUTPUT in {o.name for o in manifest.outputs}
    load_features(redis_url, version)
    async with running_app(settings_for(repo, redis_url)) as client:
        cands = [f"i{i}" for i in range(15)]
        r = await client.post("/rank", json={"user_id": "u1", "candidates": cands,
                                             "explain": True})
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        gates = np.array([it["gates"] for it in items])  # (N, T, own + shared)
        assert gates.shape == (15, 3, 5)
        np.testing.assert_allclose(gates.sum(-1), 1.0, atol=1e-5)
        for it in items:
            assert it["scores"]["like"] <= it["scores"]["click"]
            assert it["scores"]["share"] <= it["scores"]["click"]
        for j, t in enumerate(TASKS):
            sums = gates[:, j].sum(0)
            assert metric("ranker_gate_max_share", {"task": t}) == pytest.approx(
                sums.max() / sums.sum(), rel=1e-4)
