"""Document in OpenAPI the error answers the middleware and handlers really give.

FastAPI only knows the route's own responses and parameters; the middleware adds 401/404/413/503
(and reads the admin key headers), and the error handlers replace FastAPI's 422 body, so a
client (or schemathesis) reading the schema would be told the wrong thing. This patches the
generated schema once, on first request of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

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
WITH_BODY = {
    "400": "body is not parseable",
    "413": "body over max_body_bytes",
}
SPECIAL: dict[tuple[str, str, str], dict[str, Any]] = {
    ("/readyz", "get", "503"): {"type": "object", "required": ["status"]},
    ("/admin/reload", "post", "409"): {"type": "object", "required": ["result"]},
}
TEXT = {("/metrics", "get", "200")}
# the headers service.middleware.auth reads on /admin/* (as FastAPI documents optional headers)
ADMIN_PATHS = ("/admin/",)
ADMIN_HEADERS = [
    {"in": "header", "name": name, "required": False,
     "schema": {"anyOf": [{"type": "string"}, {"type": "null"}], "title": title}}
    for name, title in (("x-admin-key", "X-Admin-Key"), ("authorization", "Authorization"))
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


def document_errors(app: FastAPI) -> None:
    """Make `app.openapi()` return the patched schema."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = patch_schema(original())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
