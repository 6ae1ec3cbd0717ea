"""Request checks that depend on configuration or on the serving model; all raise InvalidRequest."""

from __future__ import annotations

from service.errors import InvalidRequest
from service.ranking import InvalidWeights, resolve_weights
from service.schemas import RankRequest
from service.settings import Settings


def check_rank_request(req: RankRequest, settings: Settings, tasks: list[str]) -> dict[str, float]:
    """Validate candidates and top_k, resolve the weights; return the weights to apply."""
    n = len(req.candidates)
    if n == 0:
        raise InvalidRequest([{"field": "candidates", "message": "at least 1 candidate"}])
    if n > settings.max_candidates:
        raise InvalidRequest([{
            "field": "candidates",
            "message": f"at most {settings.max_candidates} candidates (got {n})",
        }])
    if len(set(req.candidates)) != n:
        seen: dict[str, int] = {}
        for i, c in enumerate(req.candidates):
            if c in seen:
                raise InvalidRequest([{
                    "field": f"candidates[{i}]",
                    "message": f"duplicate candidate id (first at position {seen[c]}); "
                               "candidate ids must be unique",
                }])
            seen[c] = i
    try:
        return resolve_weights(
            tasks,
            req.weights,
            req.preset,
            defaults=settings.default_weights,
            presets=settings.presets,
            bounds=(settings.weight_min, settings.weight_max),
        )
    except InvalidWeights as e:
        raise InvalidRequest([{"field": e.field, "message": e.message}]) from e
