"""Putting the guards into the app: middleware order.

`install_guards` is called by the app factory (the process side, sockets and uvicorn, is
`launch/serve.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.guards.auth import ApiKeyMiddleware
from service.guards.limits import DeadlineMiddleware
from service.guards.ports import OpsPortMiddleware

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.settings import Settings


def hard_timeout_s(settings: Settings) -> float:
    """The whole-request backstop: explicit, or twice the route's own deadline."""
    explicit = getattr(settings, "request_hard_timeout_s", None)
    return float(explicit) if explicit else 2.0 * settings.request_timeout_s


def api_keys_of(settings: Settings) -> list[str]:
    """Configured API keys as plain strings (they are SecretStr in Settings, so never printed)."""
    out = []
    for k in getattr(settings, "api_keys", []) or []:
        out.append(k.get_secret_value() if hasattr(k, "get_secret_value") else str(k))
    return out


def install_guards(app: FastAPI, settings: Settings) -> None:
    """Add deadline, API-key and operator-port middleware (innermost first).

    Call it after adding the body limit and before the request-context middleware, so the
    guards run inside request id/metrics/overload and before the body is read.
    """
    from service import metrics
    from service.guards.openapi import document_errors

    document_errors(app)

    def reject(reason: str) -> None:
        metrics.REJECTED.labels(reason).inc()

    app.add_middleware(DeadlineMiddleware, timeout_s=hard_timeout_s(settings),
                       retry_after_s=settings.retry_after_s, on_reject=reject)
    keys = api_keys_of(settings)
    if keys:
        app.add_middleware(ApiKeyMiddleware, api_keys=keys,
                           on_deny=lambda _scope: reject("unauthorized"))
    ops_port = getattr(settings, "metrics_port", None)
    if ops_port:
        app.add_middleware(OpsPortMiddleware, ops_port=ops_port)
