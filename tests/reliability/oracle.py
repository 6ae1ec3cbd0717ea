"""Expected scores computed without the service: the test tables encoded by the schema and run
through onnxruntime directly, so a response can be checked against ITS user and items."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.registry import load_version

ATOL = 1e-5


@dataclass
class Oracle:
    """scores[version][user_id][item_id] -> per-task scores (tasks in manifest order)."""

    tasks: list[str]
    scores: dict[int, dict[str, dict[str, np.ndarray]]]

    @classmethod
    def build(cls, model_dir: Path, versions: tuple[int, ...]) -> Oracle:
        from tests.service.helpers import feature_tables

        users, items = feature_tables()
        out: dict[int, dict[str, dict[str, np.ndarray]]] = {}
        tasks: list[str] = []
        for v in versions:
            model = load_version(model_dir / str(v), warmup_sizes=())
            tasks = model.tasks
            schema = model.schema
            enc = {}
            for entity, table in (("user", users), ("item", items)):
                g = schema.group(entity)
                assert g is not None
                cols = {n: table.column(n) for n in g.feature_names if n in table.column_names}
                enc[entity] = g.encode_columns(cols, table.num_rows)
            item_ids = items.column("item_id").to_pylist()
            per_user: dict[str, dict[str, np.ndarray]] = {}
            for u, uid in enumerate(users.column("user_id").to_pylist()):
                inputs: dict[str, np.ndarray] = {
                    "user_cat": enc["user"][0][u : u + 1].astype(np.int64),
                    "user_dense": enc["user"][1][u : u + 1].astype(np.float32),
                    "item_cat": enc["item"][0].astype(np.int64),
                    "item_dense": enc["item"][1].astype(np.float32),
                    **model.context_inputs(None),
                }
                scores, _ = model.run(inputs)
                per_user[uid] = dict(zip(item_ids, scores, strict=True))
            out[v] = per_user
        return cls(tasks, out)

    def check(self, body: dict[str, Any], user_id: str, candidates: list[str]) -> None:
        """Assert a 200 /rank body is the ranking of exactly this user's candidates."""
        version = int(body["model"]["version"])
        assert version in self.scores, f"unknown model version {version}"
        got_ids = [it["id"] for it in body["items"]]
        assert sorted(got_ids) == sorted(candidates), "items are not this request's candidates"
        if body.get("degraded"):
            return  # default features by design: nothing user-specific to compare
        table = self.scores[version][user_id]
        for it in body["items"]:
            want = table[it["id"]]
            got = np.array([it["scores"][t] for t in self.tasks])
            assert np.allclose(got, want, atol=ATOL), (
                f"{user_id}/{it['id']} v{version}: scores {got} != expected {want}"
            )
