"""Calibration: measured (expected calibration error, reliability bins) and fitted on validation
as part of the model, so the exported graph serves calibrated probabilities.

- Platt: a per-task affine map of the tower logit, z -> a z + b, before the sigmoid (and before
  the click -> like chain, so p(like) <= p(click) still holds). The (a, b) of all tasks are fitted
  together by minimising the validation log loss of the model's final probabilities.
- Isotonic: the pool-adjacent-violators fit of label on probability per task, interpolated
  linearly between block centres and written as a sum of clipped ramps,
  f(p) = y0 + sum_k s_k min(relu(p - x_k), w_k) -- elementwise ops that ONNX runs as they are.
  A chained task is min(f(p_task), p_parent).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from training.data import Encoded
from training.model import MultiTaskModel

EPS = 1e-6


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> dict[str, list[float]]:
    """Equal-width bins of p: mean prediction, fraction positive and count per non-empty bin."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    idx = np.clip((p * bins).astype(int), 0, bins - 1)
    out: dict[str, list[float]] = {"mean_pred": [], "frac_pos": [], "count": []}
    for b in range(bins):
        m = idx == b
        if m.any():
            out["mean_pred"].append(float(p[m].mean()))
            out["frac_pos"].append(float(y[m].mean()))
            out["count"].append(float(m.sum()))
    return out


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: sum over bins of (share of rows) * |mean p - positive rate|."""
    r = reliability(y, p, bins)
    n = sum(r["count"])
    if not n:
        return float("nan")
    return float(sum(c / n * abs(a - b)
                     for a, b, c in zip(r["mean_pred"], r["frac_pos"], r["count"], strict=True)))


def pav(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Isotonic regression of y on p (pool adjacent violators): (block centres, block means)."""
    order = np.argsort(p, kind="stable")
    ps, ys = np.asarray(p, np.float64)[order], np.asarray(y, np.float64)[order]
    means: list[float] = []
    weights: list[float] = []
    sums_p: list[float] = []
    for pi, yi in zip(ps.tolist(), ys.tolist(), strict=True):
        means.append(yi)
        weights.append(1.0)
        sums_p.append(pi)
        while len(means) > 1 and means[-2] >= means[-1]:
            w = weights[-2] + weights[-1]
            means[-2] = (means[-2] * weights[-2] + means[-1] * weights[-1]) / w
            sums_p[-2] += sums_p[-1]
            weights[-2] = w
            del means[-1], weights[-1], sums_p[-1]
    centres = np.asarray(sums_p) / np.asarray(weights)
    return centres, np.clip(np.asarray(means), EPS, 1 - EPS)


def ramps(x: np.ndarray, y: np.ndarray, knots: int) -> tuple[np.ndarray, ...]:
    """Piecewise-linear f through (x, y), flat outside: (x_k, w_k, s_k) padded to `knots`, y0."""
    dx, dy = np.diff(x), np.diff(y)
    s = np.divide(dy, dx, out=np.zeros_like(dy), where=dx > 0)
    pad = knots - len(dx)
    xk = np.concatenate([x[:-1], np.full(pad, x[-1])])
    wk = np.concatenate([dx, np.zeros(pad)])
    sk = np.concatenate([s, np.zeros(pad)])
    return xk, wk, sk, np.asarray(y[0])


@torch.no_grad()
def _logits(model: MultiTaskModel, data: Encoded) -> torch.Tensor:
    model.eval()
    x = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in data.inputs.items()}
    return model.logits(x)[0]  # (T, N)


def calibrate(model: MultiTaskModel, val: Encoded, kind: str) -> MultiTaskModel:
    """A copy of `model` with a calibration head of `kind` fitted on `val`."""
    c = model.config
    if c.task_kind != "binary":
        raise ValueError("calibration needs binary tasks")
    if c.calibration != "none":
        raise ValueError(f"model is already calibrated ({c.calibration})")
    if kind == "platt":
        new = MultiTaskModel(dataclasses.replace(c, calibration="platt"))
        new.load_state_dict(model.state_dict(), strict=False)
        _fit_platt(new, val)
    elif kind == "isotonic":
        pred = {t: v.numpy() for t, v in model.head(_logits(model, val)).items()}
        fits = [pav(pred[t], val.labels[:, j]) for j, t in enumerate(c.tasks)]
        knots = max(max(len(x) - 1, 1) for x, _ in fits)
        new = MultiTaskModel(dataclasses.replace(c, calibration="isotonic",
                                                 calibration_knots=knots))
        new.load_state_dict(model.state_dict(), strict=False)
        with torch.no_grad():
            for j, (x, y) in enumerate(fits):
                if len(x) == 1:  # one block: a constant
                    x, y = np.array([0.0, 1.0]), np.array([y[0], y[0]])
                xk, wk, sk, y0 = ramps(x, y, knots)
                new.iso_x[j, 0] = torch.from_numpy(xk).float()
                new.iso_w[j, 0] = torch.from_numpy(wk).float()
                new.iso_s[j, 0] = torch.from_numpy(sk).float()
                new.iso_y0[j, 0] = float(y0)
    else:
        raise ValueError(f"unknown calibration {kind!r}: none, platt or isotonic")
    return new.eval()


def _fit_platt(model: MultiTaskModel, val: Encoded, steps: int = 200) -> None:
    z = _logits(model, val)  # (T, N)
    y = torch.from_numpy(np.ascontiguousarray(val.labels.T))  # (T, N)
    ab = torch.tensor([[1.0, 0.0]] * len(model.config.tasks), requires_grad=True)
    opt = torch.optim.LBFGS([ab], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")
    model.platt = ab  # the buffer the head reads, trainable while fitting

    def closure() -> torch.Tensor:
        opt.zero_grad()
        p = model.head(z)
        loss = sum(F.binary_cross_entropy(p[t].clamp(EPS, 1 - EPS), y[j])
                   for j, t in enumerate(model.config.tasks))
        assert isinstance(loss, torch.Tensor)
        loss.backward()
        return loss

    opt.step(closure)
    model.platt = ab.detach().clone()
