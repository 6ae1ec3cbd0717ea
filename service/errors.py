"""Domain exceptions and their one mapping to HTTP responses."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service import metrics

log = logging.getLogger("ranker.errors")


class ServiceError(Exception):
    """An error with a defined HTTP status, a stable `error` code and a message."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message}


class InvalidRequest(ServiceError):
    """A request that breaks a documented limit; `detail` names each field and limit."""

    status = 422
    code = "invalid_request"

    def __init__(self, detail: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{d['field']}: {d['message']}" for d in detail))
        self.detail = detail

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, "detail": self.detail}


class FeatureStoreDown(ServiceError):
    status = 503
    code = "feature_store_unavailable"


class DeadlineExceeded(ServiceError):
    status = 503
    code = "deadline_exceeded"


class ModelUnavailable(ServiceError):
    status = 503
    code = "model_unavailable"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"


def json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None,
                  request_id: str | None = None) -> Response:
    """A JSON response serialised with orjson; carries the request id when there is one."""
    if request_id is not None:
        body = {**body, "request_id": request_id}
    return Response(orjson.dumps(body), status_code=status, headers=headers,
                    media_type="application/json")


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def field_name(loc: tuple[Any, ...]) -> str:
    """("body", "weights", "click") -> "weights.click"; list positions as "candidates[3]"."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out or "body"


def _validation_detail(exc: RequestValidationError) -> list[dict[str, str]]:
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


def install_handlers(app: FastAPI) -> None:
    """Map every domain exception, validation error and HTTP error to one JSON shape."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> Response:
        if isinstance(exc, InvalidRequest):
            metrics.REJECTED.labels("invalid").inc()
        return json_response(exc.status, exc.body(), exc.headers, _request_id(request))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        metrics.REJECTED.labels("invalid").inc()
        detail = _validation_detail(exc)
        body = InvalidRequest(detail).body()
        return json_response(422, body, None, _request_id(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return json_response(exc.status_code, {"error": code, "message": str(exc.detail)},
                             dict(exc.headers or {}), _request_id(request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return json_response(500, {"error": "internal_error", "message": "internal error"},
                             None, _request_id(request))
