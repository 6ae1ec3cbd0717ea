"""The oracle-features fit: how close to the oracle a model of the generator's own form gets
from the same finite train split (issue 17's floor on the gap).

Per task k, logit z_k = cross_k[interest, category] + country_k + device_k + hour_k + surface_k
+ w_k . (activity_z, tenure_z, age_z, duration_z, duration_z^2) + b_k (+ a_k (user_bias[u] +
item_bias[i]) with `--ids`), and p(click) = sigmoid(z_click), p(like) = sigmoid(z_like) *
(p(click) + leak (1 - p(click))), the same for share: the generator's formula
(training/synthetic.py) with a free interest x category table in place of the latent bilinear
term, so it misses only the ids' small latent deviations (id_noise). Fitted with Adam on the
summed log loss, early stopping on validation; prints the oracle's and the fit's test AUC.

    python -m training.experiments.oracle_fit data/grid/r0 [--ids]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from training.metrics import auc
from training.synthetic import SURFACES, TASKS


def _codes(values: Any) -> tuple[np.ndarray, int]:
    uniq, inv = np.unique(np.asarray(values), return_inverse=True)
    return inv, len(uniq)


def _z(x: np.ndarray) -> np.ndarray:
    x = np.log1p(np.asarray(x, dtype=np.float64))
    return (x - x.mean()) / x.std()


def fit(data: Path, ids: bool = False, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    users, items = pq.read_table(data / "users.parquet"), pq.read_table(data / "items.parquet")
    leak = json.loads((data / "dataset.json").read_text())["config"]["leak"]
    interest, n_int = _codes(users["interest"])
    country, n_cty = _codes(users["country"])
    device, n_dev = _codes(users["device"])
    category, n_cat = _codes(items["category"])
    act, ten = _z(users["activity_30d"].to_numpy()), _z(users["tenure_days"].to_numpy())
    age, dur = _z(items["age_days"].to_numpy()), _z(items["duration_s"].to_numpy())

    def split(name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, np.ndarray]:
        t = pq.read_table(data / f"impressions_{name}.parquet")
        u = np.array([int(s[1:]) for s in t["user_id"].to_pylist()])
        i = np.array([int(s[1:]) for s in t["item_id"].to_pylist()])
        sf = np.array([SURFACES.index(s) for s in t["surface"].to_pylist()])
        x = {"u": u, "i": i, "g": interest[u], "c": category[i], "cty": country[u],
             "dev": device[u], "h": t["hour"].to_numpy(), "s": sf}
        xt = {k: torch.from_numpy(np.asarray(v, dtype=np.int64)) for k, v in x.items()}
        xt["dense"] = torch.from_numpy(
            np.stack([act[u], ten[u], age[i], dur[i], dur[i] ** 2], 1)).float()
        y = torch.from_numpy(np.stack([t[k].to_numpy() for k in TASKS], 1).astype(np.float32))
        return xt, y, np.stack([t[f"p_{k}"].to_numpy() for k in TASKS], 1)

    tr, va, te = split("train"), split("val"), split("test")
    n_t = len(TASKS)

    def zeros(*shape: int) -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.zeros(*shape))

    p = torch.nn.ParameterDict({
        "cross": zeros(n_t, n_int, n_cat), "cty": zeros(n_t, n_cty), "dev": zeros(n_t, n_dev),
        "h": zeros(n_t, 24), "s": zeros(n_t, len(SURFACES)), "w": zeros(n_t, 5),
        "b": torch.nn.Parameter(torch.tensor([-2.2, -3.0, -3.0])),
        "a": torch.nn.Parameter(torch.full((n_t,), 0.1)),
        "ub": zeros(users.num_rows), "ib": zeros(items.num_rows)})

    def probs(x: dict[str, torch.Tensor]) -> torch.Tensor:
        z = (p["cross"][:, x["g"], x["c"]] + p["cty"][:, x["cty"]] + p["dev"][:, x["dev"]]
             + p["h"][:, x["h"]] + p["s"][:, x["s"]] + p["w"] @ x["dense"].T + p["b"][:, None])
        if ids:
            z = z + p["a"][:, None] * (p["ub"][x["u"]] + p["ib"][x["i"]])[None]
        q = torch.sigmoid(z)
        reach = q[0] + leak * (1 - q[0])
        return torch.stack([q[0], q[1] * reach, q[2] * reach], 1).clamp(1e-7, 1 - 1e-7)

    def loss(x: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        bce = torch.nn.functional.binary_cross_entropy(probs(x), y, reduction="none")
        return bce.mean(0).sum()

    opt = torch.optim.Adam(p.parameters(), lr=0.05)
    best, bad, state, epochs = float("inf"), 0, {k: v.detach().clone() for k, v in p.items()}, 0
    for epoch in range(1, 61):
        epochs = epoch
        for b in torch.randperm(len(tr[1])).split(16384):
            opt.zero_grad()
            reg = 1e-5 * ((p["ub"] ** 2).sum() + (p["ib"] ** 2).sum()) if ids else 0.0
            (loss({k: v[b] for k, v in tr[0].items()}, tr[1][b]) + reg).backward()
            opt.step()
        with torch.no_grad():
            vl = float(loss(va[0], va[1]))
        if vl < best - 1e-6:
            best, bad, state = vl, 0, {k: v.detach().clone() for k, v in p.items()}
        else:
            bad += 1
            if bad >= 4:
                break
    with torch.no_grad():
        for k, v in state.items():
            p[k].copy_(v)
        pred = probs(te[0]).numpy()
    y, oracle = te[1].numpy(), te[2]
    out: dict[str, Any] = {"data": str(data), "ids": ids, "epochs": epochs}
    for j, t in enumerate(TASKS):
        o, f = auc(y[:, j], oracle[:, j]), auc(y[:, j], pred[:, j])
        out[t] = {"oracle": round(o, 4), "fit": round(f, 4), "gap": round(o - f, 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--ids", action="store_true", help="per-user and per-item biases too")
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(fit(a.data, a.ids)))


if __name__ == "__main__":
    main()
