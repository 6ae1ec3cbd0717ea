"""Request checks that depend on configuration or on the serving model; all raise InvalidRequest."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

from ranker.schema import DenseFeature, FeatureSchema
from service.errors import InvalidRequest
from service.ranking import InvalidWeights, resolve_weights
from service.rerank import (
    Bounds,
    InvalidRules,
    ResolvedCache,
    Rules,
    attributes,
    resolve,
    with_exclude,
)
from service.rerank_rules import RulesConfig
from service.schemas import RankRequest, RerankSpec
from service.settings import Settings

# the largest magnitude a dense context value may have (stated in the OpenAPI schema); the
# encoded value must also be a finite float32
MAX_DENSE_ABS = 1e30


def check_count(field: str, n: int, most: int, noun: str, hint: str = "") -> None:
    """A list of 1 to `most` entries: InvalidRequest naming `field` (and the limit) otherwise;
    `hint`, if given, follows the "at most" message."""
    if n == 0:
        raise InvalidRequest([{"field": field, "message": f"at least 1 {noun}"}])
    if n > most:
        raise InvalidRequest([{"field": field,
                               "message": f"at most {most} {noun}s (got {n}){hint}"}])


def check_rank_request(req: RankRequest, settings: Settings, tasks: list[str],
                       dense_context: Mapping[str, DenseFeature] | None = None
                       ) -> dict[str, float]:
    """Validate candidates, top_k and the context, resolve the weights; return the weights.

    `dense_context` maps the model's dense context features by name: their values must be
    numbers (the encoder would raise on text, or feed the model a non-finite input).
    """
    n = len(req.candidates)
    check_count("candidates", n, settings.max_candidates, "candidate")
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
    if req.top_k is not None and req.top_k > settings.max_candidates:
        raise InvalidRequest([{"field": "top_k",
                               "message": f"at most {settings.max_candidates} (max_candidates)"}])
    if dense_context and req.context:
        check_dense_context(req.context, dense_context)
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


def dense_error(value: Any, feature: DenseFeature) -> str | None:
    """Why `value` cannot be this dense feature's input, or None (null means the default)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "must be a number or null (a dense feature)"
    if not abs(value) <= MAX_DENSE_ABS:  # also NaN; ints of any size compare exactly
        return f"must be a finite number within ±{MAX_DENSE_ABS:g}"
    if not math.isfinite(feature.encode_one(float(value))):
        return "too large for this feature once normalised"
    return None


def check_dense_context(context: Mapping[str, Any],
                        dense: Mapping[str, DenseFeature]) -> None:
    """Every dense context feature the request sets must be a number the encoder can take."""
    errors = []
    for name, feature in dense.items():
        if name in context:
            why = dense_error(context[name], feature)
            if why is not None:
                errors.append({"field": f"context.{name}", "message": why})
    if errors:
        raise InvalidRequest(errors)


def check_rerank(req: RankRequest, settings: Settings, schema: FeatureSchema,
                 config: RulesConfig, bounds: Bounds | None = None,
                 cache: ResolvedCache | None = None) -> Rules | None:
    """The request's re-rank rules (its `rerank` over the rules file's preset), checked against
    the serving model's item attributes and the settings' bounds; None when no rule applies.

    With `cache`, rules without pins or request boosts are resolved once per rules version,
    schema, bounds, list length and request rules minus `filters.exclude` (the same answer,
    without re-checking every field per request: tests/service/test_rerank_fast.py)."""
    if req.rerank is None and config.default_preset is None:
        return None
    bounds = bounds or rerank_bounds(settings)
    spec = req.rerank
    key = None if cache is None else _cache_key(req, config)
    scope = (config, schema, bounds)
    try:
        if key is not None and cache is not None:
            hit = cache.get(key, scope)
            if hit is not None:
                rules, own_exclude = hit
                if own_exclude and rules is not None and spec is not None and (
                        spec.filters is not None):
                    return with_exclude(rules, spec.filters.exclude, bounds)
                return rules
        raw = None if spec is None else spec.model_dump(exclude_unset=True, by_alias=True)
        rules = resolve(raw, config.presets, config.default_preset, attributes(schema),
                        req.candidates, req.top_k, bounds)
    except InvalidRules as e:
        raise InvalidRequest([{"field": e.field, "message": e.message}]) from e
    if key is not None and cache is not None:
        cache.put(key, scope, rules, _preset_name(spec, config),
                  spec is not None and spec.filters is not None)
    return rules


_UNSET = ("unset",)  # a field the request did not set (null turns a preset's section off)


def _preset_name(spec: RerankSpec | None, config: RulesConfig) -> str | None:
    if spec is not None and "preset" in spec.model_fields_set:
        return spec.preset
    return config.default_preset


def _cache_key(req: RankRequest, config: RulesConfig) -> Hashable | None:
    """What resolved rules depend on besides the scope: the list's length and the request's
    rules as set, minus `filters.exclude`; None (not cached) when pins are in play (they
    depend on the candidates) or the request gives boosts (lists: a longer key than work)."""
    spec = req.rerank
    length = len(req.candidates) if req.top_k is None else min(req.top_k, len(req.candidates))
    fields = spec.model_fields_set if spec is not None else set()
    if "boosts" in fields or ("pins" in fields and spec is not None and spec.pins is not None):
        return None
    if "pins" not in fields and "pins" in config.presets.get(_preset_name(spec, config) or "",
                                                             {}):
        return None
    if spec is None:
        return (length,)
    parts: list[Hashable] = [length, spec.preset if "preset" in fields else _UNSET]
    for name in ("diversity", "mmr", "filters"):
        rule = getattr(spec, name)
        if name not in fields or rule is None:
            parts.append(None if name in fields else _UNSET)
            continue
        values = rule.__dict__  # the schema's checked, typed values
        parts.append(tuple([(f, values[f]) for f in sorted(rule.model_fields_set)
                            if f != "exclude"]))
    return tuple(parts)


def rerank_bounds(settings: Settings) -> Bounds:
    """The limits of re-rank rules, from the settings."""
    return Bounds(settings.rerank_boost_min, settings.rerank_boost_max,
                  settings.rerank_max_pinned_share, settings.rerank_max_window,
                  settings.rerank_max_exclude, settings.rerank_diversity_depth,
                  settings.max_candidates)
