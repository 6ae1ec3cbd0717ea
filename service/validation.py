"""Request checks that depend on configuration or on the serving model; all raise InvalidRequest."""

from __future__ import annotations

from ranker.schema import FeatureSchema
from service.errors import InvalidRequest
from service.ranking import InvalidWeights, resolve_weights
from service.rerank import Bounds, InvalidRules, Rules, attributes, resolve
from service.rerank_rules import RulesConfig
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


def check_rerank(req: RankRequest, settings: Settings, schema: FeatureSchema,
                 config: RulesConfig, bounds: Bounds | None = None) -> Rules | None:
    """The request's re-rank rules (its `rerank` over the rules file's preset), checked against
    the serving model's item attributes and the settings' bounds; None when no rule applies."""
    if req.rerank is None and config.default_preset is None:
        return None
    spec = None if req.rerank is None else req.rerank.model_dump(exclude_unset=True,
                                                                 by_alias=True)
    try:
        return resolve(spec, config.presets, config.default_preset, attributes(schema),
                       req.candidates, req.top_k, bounds or rerank_bounds(settings))
    except InvalidRules as e:
        raise InvalidRequest([{"field": e.field, "message": e.message}]) from e


def rerank_bounds(settings: Settings) -> Bounds:
    """The limits of re-rank rules, from the settings."""
    return Bounds(settings.rerank_boost_min, settings.rerank_boost_max,
                  settings.rerank_max_pinned_share, settings.rerank_max_window,
                  settings.rerank_max_exclude, settings.rerank_diversity_depth,
                  settings.max_candidates)
