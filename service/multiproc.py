"""The Prometheus multiprocess directory (several uvicorn workers share their metrics through it).

Kept free of any import of `service.metrics`: prometheus_client creates a metric's file when the
metric is defined, so the directory must be emptied before that module is first imported, or the
serving process would keep writing into files that were just deleted (and /metrics would miss
them).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


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


def prepare(workers: int) -> str | None:
    """Before `service.metrics` is imported: give several workers a directory, empty any one set.

    Files of dead pids would otherwise be summed into /metrics forever.
    """
    if workers > 1 and not os.environ.get(ENV):
        os.environ[ENV] = tempfile.mkdtemp(prefix="ranker-prom-")
    directory = os.environ.get(ENV)
    if directory:
        clean_multiproc_dir(directory)
    return directory
