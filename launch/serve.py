"""`ranker serve`: flags → Settings → Prometheus multiprocess dir → sockets → uvicorn.

The one launcher of the ranking API. It binds the public socket (and the operator socket when
`metrics_port` is set), sizes onnxruntime threads per worker, sets uvicorn's graceful shutdown
and exits 0 after a SIGTERM/SIGINT shutdown. Nothing here imports `service.metrics` (nor the
app) before the multiprocess directory is prepared.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from service.settings import Settings

# flag -> Settings field (and its RANKER_* variable, for the workers of a multiprocess run)
FLAG_TO_FIELD = {
    "model_repo": "model_repo",
    "model_name": "model_name",
    "redis_url": "redis_url",
    "failure_mode": "redis_failure_mode",
    "watch_interval": "model_watch_interval_s",
}
APP_FACTORY = "service.app:create_app_from_env"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ranker serve", description="Serve the ranking API.")
    p.add_argument("--host", help="bind address (default: RANKER_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: RANKER_PORT or 8000)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--model-repo", dest="model_repo", help="model repository directory")
    p.add_argument("--model-name", dest="model_name", help="model name under the repository")
    p.add_argument("--redis-url", dest="redis_url", help="feature store, e.g. redis://127.0.0.1:6379/0")
    p.add_argument("--failure-mode", dest="failure_mode", choices=["fail", "degrade"],
                   help="what /rank does when Redis is unavailable")
    p.add_argument("--watch-interval", dest="watch_interval", type=float,
                   help="seconds between model repository polls (0 = off)")
    p.add_argument("--log-level", default="info")
    return p


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The Settings fields given as flags (flags win over RANKER_* variables)."""
    return {field: getattr(args, flag) for flag, field in FLAG_TO_FIELD.items()
            if getattr(args, flag) is not None}


def ort_threads_per_worker(cpus: int | None, workers: int) -> int:
    """onnxruntime intra-op threads per worker so that workers together use the cores once."""
    return max(1, (cpus or 1) // max(1, workers))


def settings_for(overrides: dict[str, Any], workers: int) -> Settings:
    """Settings from RANKER_* env and the flags; ORT threads sized when configured as 0."""
    settings = Settings(**overrides)  # validates the whole configuration before any worker
    if settings.ort_intra_op_threads == 0:  # 0 = size for the machine and the worker count
        threads = ort_threads_per_worker(os.cpu_count(), workers)
        settings = settings.model_copy(update={"ort_intra_op_threads": threads})
    return settings


def clean_multiproc_dir(path: str | Path) -> int:
    """Create the Prometheus multiprocess dir, or empty it of a previous run's files."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    removed = 0
    for f in directory.glob("*.db"):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
            removed += 1
    return removed


def prepare_multiproc(workers: int) -> str | None:
    """Before `service.metrics` is imported: give several workers a directory, empty any one set.

    prometheus_client creates a metric's file when the metric is defined, so emptying the
    directory later would leave this process writing into deleted files; files of dead pids
    would otherwise be summed into /metrics forever.
    """
    if workers > 1 and not os.environ.get(MULTIPROC_ENV):
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="ranker-prom-")
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        clean_multiproc_dir(directory)
    return directory


def mark_dead(pids: Iterable[int | None]) -> None:
    """Drop the live gauges (in flight, model info, ...) of worker processes that have exited.

    prometheus_client keeps one file per process; `live*` gauge modes count only processes not
    marked dead, so without this a killed worker's last values are summed into /metrics forever.
    Counters and histograms stay: what a dead worker served was served.
    """
    from prometheus_client import multiprocess

    for pid in pids:
        if pid is not None:
            multiprocess.mark_process_dead(pid)


def supervisor(config: Any, sockets: list[socket.socket]) -> Any:
    """uvicorn's Multiprocess supervisor, marking each worker dead once it is gone.

    uvicorn replaces a dead worker in `keep_subprocess_alive`, and retires workers on SIGHUP
    (restart_all) and SIGTTOU in `handle_signals`; its run loop calls both every 0.5 s, so after
    each tick any worker no longer in `processes` has exited and been joined.
    """
    from uvicorn.supervisors import Multiprocess

    class MetricsAwareMultiprocess(Multiprocess):
        def __init__(self, config: Any, sockets: list[socket.socket]) -> None:
            super().__init__(config, sockets=sockets)
            self.known: set[int | None] = set()  # worker pids as of the last tick

        def keep_subprocess_alive(self) -> None:
            super().keep_subprocess_alive()
            current = {p.pid for p in self.processes}
            mark_dead(self.known - current)
            self.known = current

        def join_all(self) -> None:
            super().join_all()
            mark_dead(p.pid for p in self.processes)

    return MetricsAwareMultiprocess(config, sockets=sockets)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket, as uvicorn binds it (SO_REUSEADDR, inheritable for workers)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def export_for_workers(settings: Settings, overrides: dict[str, Any]) -> None:
    """Put the flag values (and the sized ORT threads) into RANKER_* variables.

    Only for several workers: uvicorn's multiprocess supervisor starts each worker as a fresh
    process that imports APP_FACTORY by name and calls it without arguments, so the environment
    is the only way the flags reach `create_app_from_env`'s Settings().
    """
    for field, value in overrides.items():
        os.environ[f"RANKER_{field.upper()}"] = str(value)
    os.environ["RANKER_ORT_INTRA_OP_THREADS"] = str(settings.ort_intra_op_threads)


def serve(settings: Settings, host: str, port: int, workers: int, log_level: str) -> int:
    """Run uvicorn with the reliability options; returns 0 after a signalled graceful stop."""
    import uvicorn

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
        supervisor(config, sockets).run()
        return 0
    # uvicorn re-raises the signal after its graceful shutdown; with these handlers in place
    # that re-raise is a no-op, so a clean SIGTERM stop exits 0 instead of dying by the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=sockets)
    return 0 if server.started else 1


def main(argv: list[str]) -> int:
    """Entry point of `ranker serve`."""
    args = build_parser().parse_args(argv)
    overrides = flag_overrides(args)
    settings = settings_for(overrides, args.workers)
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    if args.workers > 1:
        export_for_workers(settings, overrides)
    # each worker is its own process: metrics go through files that /metrics aggregates
    prepare_multiproc(args.workers)
    return serve(settings, host, port, args.workers, args.log_level)
