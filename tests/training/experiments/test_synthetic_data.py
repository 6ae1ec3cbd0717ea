"""The synthetic task-correlation data generator (MMoE paper, section 5.1) and the model budgets."""

from __future__ import annotations

import numpy as np
import pytest

from training.experiments.synthetic import (
    SHARED_BOTTOM_WIDTH,
    DataConfig,
    make_data,
    model_config,
    run_seeds,
    sin_params,
    task_weights,
)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("p", [1.0, 0.9, 0.5, 0.0, -0.3])
def test_task_weights_have_cosine_p_and_norm_c(p: float) -> None:
    data = DataConfig(c=2.5)
    w = task_weights(p, np.random.default_rng(7), data)
    assert w.shape == (2, 100)
    assert _cos(w[0], w[1]) == pytest.approx(p, abs=1e-12)
    assert np.linalg.norm(w, axis=1) == pytest.approx([2.5, 2.5], abs=1e-12)


def test_task_weights_are_fresh_per_seed() -> None:
    data = DataConfig()
    a = task_weights(0.5, np.random.default_rng(1), data)
    b = task_weights(0.5, np.random.default_rng(2), data)
    assert not np.allclose(a, b)


def test_labels_follow_the_papers_formula_without_noise() -> None:
    data = DataConfig(noise_var=0.0)
    rng = np.random.default_rng(3)
    w = task_weights(0.9, rng, data)
    x, y = make_data(50, w, rng, data)
    assert x.shape == (50, 100) and y.shape == (50, 2)
    assert x.dtype == np.float32 and y.dtype == np.float32
    alpha, beta = sin_params(data)
    assert alpha.shape == beta.shape == (10,)
    for i in range(2):
        z = x.astype(np.float64) @ w[i]
        expected = np.array([zz + sum(np.sin(alpha * zz + beta)) for zz in z])
        np.testing.assert_allclose(y[:, i], expected, rtol=1e-5, atol=1e-5)


def test_noise_variance_is_0_01() -> None:
    """At p = 1 the two labels differ only by their noise, so var(y1 − y2) = 2σ² = 0.02."""
    data = DataConfig()
    rng = np.random.default_rng(4)
    _, y = make_data(40_000, task_weights(1.0, rng, data), rng, data)
    # sample variance of 40k draws: relative s.e. sqrt(2/40000) ≈ 0.7 %, so 5 % is > 7 s.e.
    assert np.var(y[:, 0] - y[:, 1]) == pytest.approx(0.02, rel=0.05)


def test_sin_parameters_are_fixed_and_data_is_deterministic() -> None:
    data = DataConfig()
    a1, b1 = sin_params(data)
    a2, b2 = sin_params(DataConfig())
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)
    assert not np.array_equal(a1, sin_params(DataConfig(sin_seed=1))[0])

    def draw(seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        return make_data(100, task_weights(0.5, rng, data), rng, data)

    x1, y1 = draw(5)
    x2, y2 = draw(5)
    _, y3 = draw(6)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(y1, y3)


def test_run_seeds_share_data_across_models_but_not_init() -> None:
    seeds = {m: run_seeds(0, 0.5, 3, m) for m in ("mmoe", "omoe", "shared_bottom")}
    assert len({d for d, _ in seeds.values()}) == 1  # same data for a paired comparison
    assert len({i for _, i in seeds.values()}) == 3
    assert run_seeds(0, 0.5, 4, "mmoe")[0] != seeds["mmoe"][0]  # fresh data per repeat
    assert run_seeds(0, 0.9, 3, "mmoe")[0] != seeds["mmoe"][0]


def test_shared_bottom_width_matches_mmoe_budget_most_closely() -> None:
    from training.model import MultiTaskModel

    def n_params(model_type: str, width: int = SHARED_BOTTOM_WIDTH) -> int:
        model = MultiTaskModel(model_config(model_type, width))
        return sum(t.numel() for t in model.parameters())

    mmoe = n_params("mmoe")
    assert (mmoe, n_params("omoe")) == (14834, 14026)
    gaps = {w: abs(n_params("shared_bottom", w) - mmoe) for w in range(110, 141)}
    assert min(gaps, key=lambda w: gaps[w]) == SHARED_BOTTOM_WIDTH
    assert gaps[SHARED_BOTTOM_WIDTH] < 0.005 * mmoe
