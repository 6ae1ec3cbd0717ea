"""A real service for browser tests: features in the real Redis, a real uvicorn process."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import numpy as np
import pyarrow as pa

from launch.local_redis import free_port
from ranker.schema import FeatureSchema

HOST = "127.0.0.1"
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; never `playwright install`
# Without the background-networking flags Chromium's own connections fail on a closed network.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
FACTORY = "service.app:create_app_from_env"
PR_SET_PDEATHSIG = 1


def feature_tables(schema: FeatureSchema, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """Raw user and item tables for every id in the model's vocabularies, with varied features."""
    rng = np.random.default_rng(seed)
    vocab = schema.vocabularies()
    users = vocab["user.user_id"]
    items = vocab["item.item_id"]
    user_t = pa.table({
        "user_id": users,
        "country": rng.choice(vocab["user.country"], len(users)).tolist(),
        "activity": rng.exponential(3.0, len(users)),
    })
    item_t = pa.table({
        "item_id": items,
        "category": rng.choice(vocab["item.category"], len(items)).tolist(),
        "age_days": rng.uniform(0, 90, len(items)),
        "duration": rng.uniform(5, 300, len(items)),
    })
    return user_t, item_t


def load_features(redis_url: str, schema: FeatureSchema) -> None:
    """Write the tables with the real feature-store writer (as `ranker features load` does)."""
    from service.featurestore.writer import load_tables, make_sync_client

    users, items = feature_tables(schema)
    client = make_sync_client(redis_url, cluster=False)
    try:
        load_tables(client, schema, users, items)
    finally:
        client.close()


@contextlib.contextmanager
def run_service(
    model_dir: Path, redis_url: str, factory: str = FACTORY, port: int | None = None, **env: str
) -> Iterator[str]:
    """`uvicorn` serving the app factory on a (free) loopback port; yields its base URL."""
    port = port or free_port()
    environ = {
        **os.environ,
        "RANKER_MODEL_REPO": str(model_dir.parent.parent),
        "RANKER_MODEL_NAME": model_dir.parent.name,
        "RANKER_REDIS_URL": redis_url,
        "RANKER_WARMUP_BATCH_SIZES": "[1]",
        "RANKER_PLAYGROUND_ENABLED": "true",
        **env,
    }
    cmd = [
        sys.executable, "-m", "uvicorn", factory, "--factory",
        "--host", HOST, "--port", str(port), "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    base = f"http://{HOST}:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            cmd, env=environ, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
        try:
            _wait_ready(proc, base, log)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)


def _die_with_parent() -> None:
    # In the child before exec: SIGKILL it if the test process dies without cleaning up (Linux).
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _wait_ready(proc: subprocess.Popen[bytes], base: str, log: IO[bytes]) -> None:
    """Poll /readyz (bounded in time); on failure, raise with the server's own output."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            r = httpx.get(f"{base}/readyz", timeout=1.0)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text}"
        except httpx.TransportError as e:
            last = type(e).__name__
        time.sleep(0.1)
    log.seek(0)
    out = log.read().decode(errors="replace")[-4000:]
    raise RuntimeError(f"service at {base} not ready ({last}; exit {proc.poll()}):\n{out}")
