"""Domain exceptions, the one writer of error answers, and the handlers that map exceptions to it.

Every error the service gives, from a route or from a middleware, is `error_response(...)`:
`{"error", "message"[, "detail"], "request_id"}`. Handlers return it; a pure ASGI middleware
sends it with `await error_response(...)(scope, receive, send)` (a Response is an ASGI app).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Scope

from service import metrics

log = logging.getLogger("ranker.errors")

Detail = list[dict[str, str]]  # [{"field": ..., "message": ...}]


def error_response(status: int, error: str, message: str, *, request_id: str | None,
                   detail: Detail | None = None,
                   headers: Mapping[str, str] | None = None) -> Response:
    """The JSON error answer: stable `error` code, readable `message`, the request id."""
    body: dict[str, Any] = {"error": error, "message": message}
    if detail is not None:
        body["detail"] = detail
    body["request_id"] = request_id
    try:
        data = orjson.dumps(body)
    except TypeError:  # text from the request that is not valid Unicode: escape, never a 500
        data = orjson.dumps(escaped(body))
    return Response(data, status_code=status, headers=headers, media_type="application/json")


def escaped(value: Any) -> Any:
    """`value` with every string made printable (see `printable`), for the error writer."""
    if isinstance(value, str):
        return printable(value, limit=10_000)
    if isinstance(value, dict):
        return {escaped(k): escaped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [escaped(v) for v in value]
    return value


def request_id_of(scope: Scope) -> str | None:
    """The request id the request-context middleware put in scope["state"], if any."""
    state = scope.get("state")
    rid = state.get("request_id") if isinstance(state, dict) else None
    return rid if isinstance(rid, str) else None


class ServiceError(Exception):
    """An error with a defined HTTP status, a stable `error` code and a message."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None,
                 detail: Detail | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.detail = detail


class InvalidRequest(ServiceError):
    """A request that breaks a documented limit; `detail` names each field and limit."""

    status = 422
    code = "invalid_request"

    def __init__(self, detail: Detail) -> None:
        super().__init__("; ".join(f"{d['field']}: {d['message']}" for d in detail),
                         detail=detail)


class Forbidden(ServiceError):
    """A request asking for something its key does not allow (a forced arm without the admin
    key)."""

    status = 403
    code = "forbidden"


class InferenceFailed(ServiceError):
    """The model raised while scoring (a version that breaks at some batch size): a 500 that
    names the version, and an error outcome for the arm that served it."""

    status = 500
    code = "inference_failed"


class FeatureStoreDown(ServiceError):
    status = 503
    code = "feature_store_unavailable"


class DeadlineExceeded(ServiceError):
    status = 503
    code = "deadline_exceeded"


class ModelUnavailable(ServiceError):
    status = 503
    code = "model_unavailable"


def printable(text: str, limit: int = 80) -> str:
    """A request's text made safe to echo: lone surrogates escaped (orjson refuses them),
    bounded in length."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def field_name(loc: tuple[Any, ...]) -> str:
    """("body", "weights", "click") -> "weights.click"; list positions as "candidates[3]".

    Dict keys come from the request: escaped and bounded; pydantic's "[key]" marker (an
    error in the key itself) is dropped, the key names the field.
    """
    parts = [p for p in loc if p not in ("body", "[key]")]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            p = printable(str(p))
            out += f".{p}" if out else p
    return out or "body"


def validation_detail(exc: RequestValidationError) -> Detail:
    """pydantic's errors as the service's `detail`: field name and message, at most 20."""
    detail = []
    for err in exc.errors()[:20]:  # bounded: a 1000-item body could produce 1000 errors
        msg = str(err.get("msg", "invalid"))
        loc = tuple(err.get("loc", ()))
        if err.get("type") == "finite_number":
            msg = "must be a finite number (NaN and infinity are not accepted)"
        elif err.get("type") == "json_invalid":
            where = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
            msg, loc = f"body is not valid JSON{where}", ()
        detail.append({"field": field_name(loc), "message": msg})
    return detail


async def on_service_error(request: Request, exc: ServiceError) -> Response:
    if isinstance(exc, InvalidRequest):
        metrics.REJECTED.labels("invalid").inc()
    return error_response(exc.status, exc.code, exc.message, detail=exc.detail,
                          headers=exc.headers, request_id=request_id_of(request.scope))


async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
    metrics.REJECTED.labels("invalid").inc()
    err = InvalidRequest(validation_detail(exc))
    return error_response(err.status, err.code, err.message, detail=err.detail,
                          request_id=request_id_of(request.scope))


async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers,
                          request_id=request_id_of(request.scope))


async def on_unhandled(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error")
    return error_response(500, "internal_error", "internal error",
                          request_id=request_id_of(request.scope))


# for FastAPI(exception_handlers=...): every domain exception, validation and HTTP error, and
# anything unhandled, answered through error_response
EXCEPTION_HANDLERS: dict[Any, Any] = {
    ServiceError: on_service_error,
    RequestValidationError: on_validation_error,
    StarletteHTTPException: on_http_error,
    Exception: on_unhandled,
}
