"""`ranker run`, the main job: model, Redis, features, then serve, in one command.

1. Use the newest complete model in the repository, or train one on the synthetic data
   (`training.pipeline.ensure_default_model`; torch is imported only in that case).
2. Use the Redis at `--redis-url` / `RANKER_REDIS_URL`, or start a private embedded one.
3. Load the user and item feature tables into Redis with the model's schema.
4. Serve (`ranker serve` in a child process) on 127.0.0.1:8000, wait until it is ready and
   print a working `curl` for `/rank` built from real ids in the loaded tables.
5. On Ctrl-C / SIGTERM: stop the server, then the embedded Redis.

`--smoke` sends that request itself, checks for a 200 with every candidate ranked, and exits
(0 = it worked). `--no-serve` stops after step 3 (the docker-compose trainer job).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from launch import procs
from ranker.manifest import list_versions, load_manifest, load_schema, version_dir
from ranker.schema import FeatureSchema

EXAMPLE_CANDIDATES = 5
POLL_S = 0.2


class MainJobError(RuntimeError):
    """A step of the main job failed; the message says which and what to do."""


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="ranker run",
        description="Train a model if the repository has none, start Redis (embedded unless "
        "RANKER_REDIS_URL is set), load the features and serve the ranking API.",
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="listen port, 0 = any free port")
    p.add_argument("--repo", type=Path, default=Path(env("RANKER_MODEL_REPO", "models")),
                   help="model repository (default $RANKER_MODEL_REPO or %(default)s)")
    p.add_argument("--name", default=env("RANKER_MODEL_NAME", "mmoe"),
                   help="model name (default $RANKER_MODEL_NAME or %(default)s)")
    p.add_argument("--data-dir", type=Path, default=Path("data/synthetic"),
                   help="synthetic dataset dir with users/items parquet (default %(default)s)")
    p.add_argument("--small", action="store_true",
                   help="if a model must be trained: a small dataset and a short run (seconds)")
    p.add_argument("--redis-url", default=env("RANKER_REDIS_URL"),
                   help="use this Redis instead of an embedded one (default $RANKER_REDIS_URL)")
    p.add_argument("--startup-timeout", type=float, default=120.0,
                   help="seconds to wait for the server to become ready (default %(default)s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true",
                      help="send one /rank request, check it, stop everything and exit")
    mode.add_argument("--no-serve", action="store_true",
                      help="stop after loading the features (model + Redis preparation only)")
    return p


# ---- step 1: the model -----------------------------------------------------------------------


def ensure_model(repo: Path, name: str, data_dir: Path, small: bool) -> Path:
    """The newest complete version dir of `name`, training one first if there is none."""
    versions = list_versions(repo, name)
    if versions:
        vdir = version_dir(repo, name, versions[-1])
        say(f"model: using {vdir}")
        return vdir
    say(f"model: none in {repo / name}; training one on the synthetic data (needs torch)")
    try:
        from training.pipeline import ensure_default_model
    except ImportError as exc:  # the service image has no torch: the trainer job makes models
        raise MainJobError(
            f"no model in {repo / name} and the trainer is not installed ({exc}); "
            'install with pip install -e ".[train]" or run the trainer job'
        ) from exc
    t0 = time.monotonic()
    vdir = Path(ensure_default_model(repo, data_dir, name=name, small=small))
    say(f"model: trained and exported {vdir} in {time.monotonic() - t0:.0f}s")
    return vdir


# ---- step 2 + 3: Redis and the features ------------------------------------------------------


def read_tables(data_dir: Path) -> tuple[pa.Table, pa.Table]:
    """The users and items parquet tables of the dataset."""
    paths = [data_dir / "users.parquet", data_dir / "items.parquet"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise MainJobError(f"feature tables missing: {', '.join(missing)} (run `ranker data`)")
    return pq.read_table(paths[0]), pq.read_table(paths[1])


def load_features(redis_url: str, schema: FeatureSchema, users: pa.Table, items: pa.Table) -> None:
    """Write the encoded user and item records to Redis (a new load, switched atomically)."""
    from service.featurestore.writer import load_tables, make_sync_client

    client = make_sync_client(redis_url)
    try:
        report = load_tables(client, schema, users, items, progress=False)
    finally:
        client.close()
    say(f"features: loaded {report.users} users and {report.items} items "
        f"({report.bytes_written / 1e6:.1f} MB) in {report.seconds:.1f}s")


@contextmanager
def redis_for(url: str | None) -> Iterator[str]:
    """The given Redis URL, or an embedded redis-server for the duration of the block."""
    if url:
        say("redis: using the configured server")
        yield url
        return
    from launch.local_redis import RedisServer

    try:
        server = RedisServer()
    except FileNotFoundError as exc:  # no redis-server: the `local` extra is not installed
        raise MainJobError(f"{exc}, or set --redis-url / RANKER_REDIS_URL") from exc
    server.start()
    say(f"redis: started an embedded redis-server on {server.host}:{server.port}")
    try:
        yield server.url
    finally:
        server.stop()
        say("redis: embedded server stopped")


# ---- step 4: serve ---------------------------------------------------------------------------


def example_request(schema: FeatureSchema, users: pa.Table, items: pa.Table) -> dict[str, Any]:
    """A /rank body with a real user, real items and a context from the model's vocabularies."""
    user_g, item_g = schema.group("user"), schema.group("item")
    assert user_g is not None and item_g is not None and user_g.key and item_g.key
    user_ids = users.column(user_g.key).to_pylist()
    item_ids = items.column(item_g.key).to_pylist()
    if not user_ids or len(item_ids) < 2:
        raise MainJobError("the feature tables are empty")
    body: dict[str, Any] = {
        "user_id": str(user_ids[0]),
        "candidates": [str(i) for i in item_ids[:EXAMPLE_CANDIDATES]],
    }
    ctx_g = schema.group("context")
    if ctx_g is not None:
        context = {f.name: f.vocab.values[0] for f in ctx_g.categorical if f.vocab.values}
        if context:
            body["context"] = context
    return body


def curl_command(base_url: str, body: dict[str, Any]) -> str:
    return (f"curl -s -X POST {base_url}/rank -H 'content-type: application/json' "
            f"-d {shlex.quote(json.dumps(body))}")


def check_port_free(host: str, port: int) -> None:
    """Fail with a hint before starting uvicorn if something already listens on the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise MainJobError(
                f"cannot listen on {host}:{port} ({exc.strerror}); is another server running? "
                'pick another port: make run RUN_ARGS="--port 8080"'
            ) from exc


def start_server(host: str, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`ranker serve` as a child process (same process group, so Ctrl-C reaches it too; the
    kernel kills it if the main job dies without cleaning up)."""
    cmd = [sys.executable, "-m", "launch.cli", "serve", "--host", host, "--port", str(port)]
    return procs.spawn(cmd, env=env)


def http(method: str, url: str, body: dict[str, Any] | None = None,
         timeout: float = 5.0) -> tuple[int, bytes]:
    """One HTTP request with the standard library: (status, body); no exception on 4xx/5xx."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def wait_ready(base_url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Poll /readyz until 200; fail early if the server exits, or after `timeout_s`."""
    try:
        procs.wait_http(f"{base_url}/readyz", proc, timeout_s, what="the server",
                        interval_s=POLL_S)
    except procs.NotReady as exc:
        raise MainJobError(str(exc)) from exc


def smoke(base_url: str, body: dict[str, Any]) -> None:
    """One /rank request: must be a 200 that ranks every candidate."""
    status, raw = http("POST", f"{base_url}/rank", body, timeout=10.0)
    if status != 200:
        raise MainJobError(f"smoke: POST /rank returned {status}: {raw[:500]!r}")
    ranked = json.loads(raw)["items"]
    if sorted(it["id"] for it in ranked) != sorted(body["candidates"]):
        raise MainJobError(f"smoke: response does not rank the candidates: {raw[:500]!r}")
    say(f"smoke: POST /rank -> 200, top item {ranked[0]['id']} score {ranked[0]['score']:.4f}")


class _Stop(Exception):
    """Raised by the SIGTERM handler to unwind to the cleanup code."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Stop()


def serve(args: argparse.Namespace, redis_url: str, vdir: Path, body: dict[str, Any]) -> None:
    """Run the server until it exits or we are told to stop; in smoke mode, test it and stop."""
    port = args.port or procs.free_port()
    check_port_free(args.host, port)
    base_url = f"http://{args.host}:{port}"
    env = {**os.environ, "RANKER_REDIS_URL": redis_url,
           "RANKER_MODEL_REPO": str(vdir.parent.parent.resolve()),
           "RANKER_MODEL_NAME": vdir.parent.name}
    env.setdefault("RANKER_PLAYGROUND_ENABLED", "true")  # local run: the page is on
    proc = start_server(args.host, port, env)
    try:
        wait_ready(base_url, proc, args.startup_timeout)
        say(f"serving {vdir.parent.name} v{vdir.name} on {base_url}  (Ctrl-C to stop)")
        print("\nTry it:\n\n  " + curl_command(base_url, body) + "\n", flush=True)
        if env["RANKER_PLAYGROUND_ENABLED"].lower() in ("1", "true", "yes", "on"):
            say(f"playground: open {base_url}/playground in a browser")
        if args.smoke:
            smoke(base_url, body)
            return
        while proc.poll() is None:
            time.sleep(POLL_S)
        if proc.returncode:
            raise MainJobError(f"the server exited with code {proc.returncode}")
    finally:
        procs.stop(proc, 15.0)  # SIGTERM: uvicorn shuts down gracefully


def say(msg: str) -> None:
    print(f"[ranker run] {msg}", flush=True)


def main(argv: list[str]) -> int:
    """Entry point of `ranker run`."""
    args = _parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        vdir = ensure_model(args.repo, args.name, args.data_dir, args.small)
        schema = load_schema(vdir, load_manifest(vdir))
        users, items = read_tables(args.data_dir)
        body = example_request(schema, users, items)
        with redis_for(args.redis_url) as redis_url:
            load_features(redis_url, schema, users, items)
            if args.no_serve:
                say("done (--no-serve)")
                return 0
            serve(args, redis_url, vdir, body)
        return 0
    except MainJobError as exc:
        say(f"error: {exc}")
        return 1
    except (KeyboardInterrupt, _Stop):
        say("stopped")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
