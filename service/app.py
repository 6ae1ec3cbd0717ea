"""The FastAPI app factory: routes, error handlers and the whole middleware stack, in order.

Resources (model registry, Redis client, inference executor, ranking pipeline) are opened in
the lifespan, `service.lifespan`, not here.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware import Middleware

from service import metrics
from service.errors import EXCEPTION_HANDLERS
from service.lifespan import lifespan
from service.middleware.auth import ApiKeyMiddleware
from service.middleware.body_limit import BodyLimitMiddleware
from service.middleware.context import RequestContextMiddleware
from service.middleware.cors import cors_middleware
from service.middleware.deadline import DeadlineMiddleware, hard_timeout_s
from service.middleware.ports import OpsPortMiddleware
from service.openapi import document_errors
from service.playground import playground_router
from service.routes import ops, rank
from service.settings import Settings, get_settings

ROUTES = ("/rank", "/healthz", "/readyz", "/model", "/metrics", "/admin/reload", "/admin/pin",
          "/admin/unpin")


def reject(reason: str) -> None:
    """Count a request refused by a middleware (the deadline backstop, a missing key)."""
    metrics.REJECTED.labels(reason).inc()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; resources are created in its lifespan, not here."""
    settings = settings or get_settings()
    # Outermost first; each layer sees only what the ones above let through.
    # - CORS: answers preflights before any limit, and puts its headers on every answer below,
    #   errors included (a browser can read a 413 or 503 only with them).
    # - request context: every later answer, refusals included, carries the request id and is
    #   counted and timed; the in-flight limit refuses before any other work.
    # - operator port, then keys: a route that is not served on this port is a 404 before any
    #   key is asked for; both refuse before the body is read.
    # - deadline backstop: covers reading the body (a slow client) and everything after it.
    # - body limit: innermost, so an oversized body is never parsed.
    stack = [
        cors_middleware(settings),  # None without origins
        Middleware(RequestContextMiddleware, routes=ROUTES, max_inflight=settings.max_inflight,
                   retry_after_s=settings.retry_after_s),
        Middleware(OpsPortMiddleware, ops_port=settings.metrics_port)
        if settings.metrics_port else None,
        Middleware(ApiKeyMiddleware, api_keys=settings.api_keys,
                   admin_key=settings.admin_api_key, on_deny=lambda _: reject("unauthorized"))
        if settings.api_keys or settings.admin_api_key else None,
        Middleware(DeadlineMiddleware, timeout_s=hard_timeout_s(settings),
                   retry_after_s=settings.retry_after_s, on_reject=reject),
        Middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes),
    ]
    app = FastAPI(
        title="mmoe-ranker",
        summary="Multi-task (click, like, share) ranking with per-request task weights",
        version="0.1.0",
        lifespan=lifespan(settings),
        middleware=[m for m in stack if m is not None],
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.include_router(rank.router)
    app.include_router(ops.router)
    if settings.playground_enabled:
        app.include_router(playground_router)
    document_errors(app, settings)
    return app


def create_app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` (several workers): settings from the environment."""
    return create_app(Settings())
