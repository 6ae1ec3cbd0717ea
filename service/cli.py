"""`ranker serve`: run the ranking API under uvicorn; settings from RANKER_* env and flags."""

from __future__ import annotations

import argparse
import os

from service import multiproc

FLAG_TO_ENV = {
    "model_repo": "RANKER_MODEL_REPO",
    "model_name": "RANKER_MODEL_NAME",
    "redis_url": "RANKER_REDIS_URL",
    "failure_mode": "RANKER_REDIS_FAILURE_MODE",
    "watch_interval": "RANKER_MODEL_WATCH_INTERVAL_S",
}


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


def serve_main(argv: list[str]) -> int:
    """Parse flags, export them as RANKER_* env (so every worker sees them), run uvicorn."""
    args = build_parser().parse_args(argv)
    for flag, env in FLAG_TO_ENV.items():
        value = getattr(args, flag)
        if value is not None:
            os.environ[env] = str(value)

    from service.settings import Settings

    settings = Settings()  # validates the whole configuration before any worker starts
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    # each worker is its own process: metrics go through files that /metrics aggregates; the
    # directory is prepared before anything imports service.metrics
    multiproc.prepare(args.workers)
    # sockets (+ metrics_port), graceful shutdown, ORT threads per worker
    from service.guards.wiring import serve

    return serve(settings, host, port, args.workers, args.log_level)
