"""Document in OpenAPI the error answers the middleware and handlers really give, and every
limit the service enforces.

FastAPI only knows the route's own responses and parameters; the middleware adds
401/403/404/413/503 (and reads the admin key headers), and the error handlers replace FastAPI's
422 body, so a client (or schemathesis) reading the schema would be told the wrong thing.
Limits that come from configuration (candidate count, weight bounds, presets, `top_k`) or from
the serving model (its task names, its dense context features) are written into the request
schema, so a request the schema allows is one the service accepts. The schema is built on
first request of it and again when the serving model's tasks or features change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from service.schemas import INT_BOUNDS
from service.servedlog.feedback import TS_MAX, TS_MIN
from service.validation import MAX_DENSE_ABS

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.settings import Settings

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "stable error code"},
        "message": {"type": ["string", "null"]},
        "detail": {"type": ["array", "null"], "items": {"type": "object"}},
        "request_id": {"type": ["string", "null"]},
    },
}
REF = {"$ref": "#/components/schemas/ServiceError"}
# status -> description; every operation may answer these (401/404 depend on configuration)
COMMON = {
    "401": "missing or invalid X-API-Key / admin key (when keys are configured)",
    "404": "route not served on this port (operator port split) or unknown",
    "422": "a field breaks a limit; `detail` names each field and limit",
    "503": "overloaded, deadline exceeded, feature store or model unavailable; see Retry-After",
}
ADMIN = {"403": "admin routes are off: API keys configured and no admin key"}
WITH_BODY = {
    "400": "body is not parseable",
    "413": "body over max_body_bytes",
}
SPECIAL: dict[tuple[str, str, str], dict[str, Any]] = {
    ("/readyz", "get", "503"): {"type": "object", "required": ["status"]},
    ("/admin/reload", "post", "409"): {"type": "object", "required": ["result"]},
    ("/admin/pin", "post", "409"): {"type": "object", "required": ["result"]},
    ("/admin/unpin", "post", "409"): {"type": "object", "required": ["result"]},
}
TEXT = {("/metrics", "get", "200")}
# the headers service.middleware.auth reads on /admin/* (as FastAPI documents optional headers)
ADMIN_PATHS = ("/admin/",)
ADMIN_HEADERS = [
    {"in": "header", "name": name, "required": False,
     "schema": {"anyOf": [{"type": "string"}, {"type": "null"}], "title": title}}
    for name, title in (("x-admin-key", "X-Admin-Key"), ("authorization", "Authorization"))
]

# /rank's QA header (service/routes/rank.py:forced_arm): read from the request, not a parameter
FORCE_ARM_PARAMETERS = [
    {"in": "header", "name": "X-Ranker-Arm", "required": False,
     "description": "QA: serve this experiment arm, `experiment/arm`, whatever the user's "
                    "assignment (docs/experiments.md). Needs the admin key (X-Admin-Key or "
                    "Authorization: Bearer): 403 without it, 422 for an unknown experiment or "
                    "arm. The response and the served log mark the arm as forced.",
     # the declared values replace the pattern when the schema is served (state_forced_arms)
     "schema": {"type": "string", "pattern": "^[^/]+/[^/]+$", "title": "X-Ranker-Arm"}},
    *ADMIN_HEADERS,
]


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def patch_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the common error responses to every operation of an OpenAPI document (in place)."""
    schema.setdefault("components", {}).setdefault("schemas", {})["ServiceError"] = ERROR_SCHEMA
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            responses = op["responses"]
            if path.startswith(ADMIN_PATHS):
                op.setdefault("parameters", []).extend(ADMIN_HEADERS)
            codes = dict(COMMON)
            if path.startswith(ADMIN_PATHS):
                codes.update(ADMIN)
            if "requestBody" in op:
                codes.update(WITH_BODY)
            for code, text in codes.items():
                responses[code] = {"description": text, "content": _json(REF)}
            for (p, m, code), special in SPECIAL.items():
                if (p, m) == (path, method):
                    body = {"anyOf": [special, REF]} if code in responses else special
                    responses[code] = {"description": "see docs/reliability.md",
                                       "content": _json(body)}
            for p, m, code in TEXT:
                if (p, m) == (path, method):
                    responses[code] = {"description": "Prometheus text exposition",
                                       "content": {"text/plain": {"schema": {"type": "string"}}}}
    return schema


def nullable_branch(prop: dict[str, Any]) -> dict[str, Any]:
    """The non-null branch of an optional property's `anyOf` (or the property itself)."""
    for branch in prop.get("anyOf", ()):
        if branch.get("type") != "null":
            return branch
    return prop


def state_feedback_limits(schemas: dict[str, Any], settings: Settings,
                          tasks: Sequence[str] | None) -> None:
    """Write /feedback's limits into its schemas (in place): 1..feedback_max_events events,
    each one of the serving model's tasks, `ts` within the fixed bounds."""
    batch, event = schemas.get("FeedbackRequest"), schemas.get("FeedbackEventIn")
    if batch is None or event is None:
        return
    batch["properties"]["events"].update(minItems=1, maxItems=settings.feedback_max_events)
    props = event["properties"]
    if tasks is not None:
        props["event"]["enum"] = list(tasks)
    props["ts"].update(minimum=TS_MIN, maximum=TS_MAX)


def state_rerank_presets(schemas: dict[str, Any], presets: Sequence[str]) -> None:
    """`rerank.preset` names a preset of the rules file; with none, only null is valid."""
    spec = schemas.get("RerankSpec")
    if spec is None:
        return
    branch = nullable_branch(spec["properties"]["preset"])
    if presets:
        branch["enum"] = sorted(presets)
    else:
        branch.clear()
        branch["not"] = {}


def state_limits(schema: dict[str, Any], settings: Settings, tasks: Sequence[str] | None,
                 dense_context: Sequence[str], rerank_presets: Sequence[str] = ()
                 ) -> dict[str, Any]:
    """Write the enforced limits into the request schemas (in place); see the module doc."""
    schemas = schema.get("components", {}).get("schemas", {})
    state_feedback_limits(schemas, settings, tasks)
    state_rerank_presets(schemas, rerank_presets)
    req = schemas.get("RankRequest")
    if req is None:
        return schema
    props = req["properties"]
    n_max = settings.max_candidates
    props["candidates"].update(minItems=1, maxItems=n_max, uniqueItems=True)
    weights = nullable_branch(props["weights"])
    weights["additionalProperties"] = {"type": "number", "minimum": settings.weight_min,
                                       "maximum": settings.weight_max}
    if tasks is not None:  # a weight for a task the model does not have is refused
        weights["propertyNames"] = {"enum": list(tasks)}
        weights["maxProperties"] = len(tasks)
    nullable_branch(props["preset"])["enum"] = sorted(settings.presets)
    nullable_branch(props["top_k"]).update(minimum=1, maximum=n_max)
    context = nullable_branch(props["context"])
    for branch in context["additionalProperties"]["anyOf"]:
        if branch.get("type") == "integer":
            branch.update(minimum=INT_BOUNDS[0], maximum=INT_BOUNDS[1])
    if dense_context:
        number = {"anyOf": [{"type": "number", "minimum": -MAX_DENSE_ABS,
                             "maximum": MAX_DENSE_ABS}, {"type": "null"}],
                  "description": "a dense context feature of the serving model"}
        context["properties"] = {name: dict(number) for name in dense_context}
    return schema


Shape = tuple[tuple[str, ...] | None, tuple[str, ...], tuple[str, ...], tuple[str, ...]]


def serving_shape(app: FastAPI) -> Shape:
    """(tasks, dense context feature names) of the serving model ((None, ()) before one), the
    re-rank presets and the forcible `experiment/arm` values in force."""
    state = getattr(app.state, "ranker", None)
    pipeline = getattr(state, "pipeline", None)
    rules = getattr(pipeline, "rules", None)
    presets = tuple(sorted(rules.current().presets)) if rules is not None else ()
    arms = getattr(pipeline, "arms", None)
    forced = () if arms is None else tuple(sorted(
        f"{e.name}/{a.name}" for e in arms.config.experiments.experiments for a in e.arms))
    serving = getattr(state, "serving", None)
    if serving is None:
        return None, (), presets, forced
    model = serving.model
    return tuple(model.tasks), tuple(model.dense_context), presets, forced


def state_forced_arms(schema: dict[str, Any], values: Sequence[str]) -> None:
    """/rank's X-Ranker-Arm takes the declared `experiment/arm` values (any other is a 422);
    without an experiment there is none to force and the header is not offered."""
    op = schema.get("paths", {}).get("/rank", {}).get("post")
    if op is None:
        return
    params = op.get("parameters", [])
    if not values:
        op["parameters"] = [p for p in params if p.get("name") != "X-Ranker-Arm"]
        return
    for p in params:
        if p.get("name") == "X-Ranker-Arm":
            p["schema"] = {"type": "string", "enum": list(values), "title": "X-Ranker-Arm"}


def document_errors(app: FastAPI, settings: Settings | None = None) -> None:
    """Make `app.openapi()` return the patched schema (with the limits, given `settings`)."""
    original = app.openapi
    built_for: list[Any] = [None]

    def openapi() -> dict[str, Any]:
        shape = serving_shape(app)
        if app.openapi_schema is None or built_for[0] != shape:
            app.openapi_schema = None  # FastAPI's own generator caches too
            schema = patch_schema(original())
            if settings is not None:
                state_limits(schema, settings, *shape[:3])
            state_forced_arms(schema, shape[3])
            app.openapi_schema, built_for[0] = schema, shape
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
