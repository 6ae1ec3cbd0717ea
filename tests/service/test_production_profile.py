"""The production profile at a small scale, end to end (issue 20): `ranker data --profile
production` -> train with the list feature -> export -> `ranker features load` -> /rank, with a
real redis-server, real onnxruntime and the real app factory."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from launch.features import load_main
from launch.train import data_main
from ranker.manifest import load_manifest, load_schema
from tests.service.helpers import running_app
from tests.support import settings_for
from tests.tiny import MODEL_NAME
from training.pipeline import export_run, run_training
from training.spec import load_spec
from training.synthetic import HISTORY_COLUMN
from training.train import TrainConfig

pytestmark = pytest.mark.asyncio

SCALE = "0.002"  # 2 000 users, 200 items, 20 000 impressions: the production shape in seconds


@pytest.fixture(scope="module")
def production_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("production")
    data = base / "data"
    assert data_main(["--profile", "production", "--scale", SCALE, "--out", str(data)]) == 0
    report = run_training(load_spec("synthetic_production"), base / "run",
                          {"n_experts": 4, "expert_hidden": [16], "tower_hidden": [8]},
                          TrainConfig(epochs=1, progress=False), data_dir=data, baselines=False)
    assert report["models"]["mmoe"]["test"]["click"]["auc"] > 0.5
    vdir = export_run(base / "run", base / "models", MODEL_NAME)
    return data, vdir


async def test_the_production_shape_trains_loads_and_ranks(production_model, redis_url,
                                                           capsys) -> None:
    data, vdir = production_model
    schema = load_schema(vdir, load_manifest(vdir))
    user = schema.group("user")
    item = schema.group("item")
    assert user is not None and item is not None
    assert [f.name for f in user.lists] == [HISTORY_COLUMN] and user.lists[0].max_len == 20
    assert len(user.feature_names) >= 25 and len(item.feature_names) >= 23  # tens of features
    users = pq.read_table(data / "users.parquet")
    assert load_main(["--model-dir", str(vdir), "--users", str(data / "users.parquet"),
                      "--items", str(data / "items.parquet"), "--redis-url", redis_url,
                      "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"loaded {users.num_rows} users and" in out
    lengths = [len(h or []) for h in users.column(HISTORY_COLUMN).to_pylist()]
    with_history = f"u{next(k for k, n in enumerate(lengths) if n)}"
    without = f"u{lengths.index(0)}"
    cands = [f"i{k}" for k in range(100)]
    async with running_app(settings_for(vdir.parent.parent, redis_url)) as c:
        for uid in (with_history, without, "u_new"):
            r = await c.post("/rank", json={"user_id": uid, "candidates": cands,
                                            "context": {"hour": 20, "surface": "home"}})
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(body["items"]) == 100
            assert body["defaulted"]["items"] == 0
            assert body["defaulted"]["user"] == (1 if uid == "u_new" else 0)
