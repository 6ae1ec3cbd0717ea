"""Putting the guards into the app and the process: middleware order, sockets, uvicorn options.

`install_guards` is called by the app factory; `serve` is what `ranker serve` runs: it binds
the public socket (and the operator socket when `metrics_port` is set), cleans the Prometheus
multiprocess directory, sizes onnxruntime threads per worker, sets uvicorn's graceful shutdown
and exits 0 after a SIGTERM/SIGINT shutdown.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import TYPE_CHECKING, Any

from service.guards.auth import ApiKeyMiddleware
from service.guards.limits import DeadlineMiddleware
from service.guards.ports import OpsPortMiddleware

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.settings import Settings

APP_FACTORY = "service.app:create_app_from_env"


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


def ort_threads_per_worker(cpus: int | None, workers: int) -> int:
    """onnxruntime intra-op threads per worker so that workers together use the cores once."""
    return max(1, (cpus or 1) // max(1, workers))


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket, as uvicorn binds it (SO_REUSEADDR, inheritable for workers)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings, host: str, port: int, workers: int, log_level: str) -> int:
    """Run uvicorn with the reliability options; returns 0 after a signalled graceful stop."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    if settings.ort_intra_op_threads == 0:  # 0 = size for the machine and the worker count
        threads = ort_threads_per_worker(os.cpu_count(), workers)
        os.environ["RANKER_ORT_INTRA_OP_THREADS"] = str(threads)
        settings = settings.model_copy(update={"ort_intra_op_threads": threads})
    app: Any
    if workers > 1:
        app = APP_FACTORY
    else:
        from service.app import create_app

        app = create_app(settings)
    config = uvicorn.Config(app, host=host, port=port, workers=workers, factory=workers > 1,
                            log_level=log_level,
                            timeout_graceful_shutdown=settings.graceful_shutdown_s)
    sockets = [bind(host, port)]
    if settings.metrics_port:
        sockets.append(bind(host, settings.metrics_port))
    server = uvicorn.Server(config)
    if workers > 1:
        Multiprocess(config, sockets=sockets).run()
        return 0
    # uvicorn re-raises the signal after its graceful shutdown; with these handlers in place
    # that re-raise is a no-op, so a clean SIGTERM stop exits 0 instead of dying by the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=sockets)
    return 0 if server.started else 1
