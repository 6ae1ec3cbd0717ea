"""Putting the service into a process: sockets and uvicorn options.

`serve` is what `ranker serve` runs: it binds the public socket (and the operator socket when
`metrics_port` is set), cleans the Prometheus multiprocess directory, sizes onnxruntime threads
per worker, sets uvicorn's graceful shutdown and exits 0 after a SIGTERM/SIGINT shutdown.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.settings import Settings

APP_FACTORY = "service.app:create_app_from_env"


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
