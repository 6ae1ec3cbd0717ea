"""A test-only app factory: the real app, whose process lingers after its lifespan has closed.

So a test can count, on a redis-server that keeps running, the connections the service still
holds once it has shut down, before the kernel closes whatever the process left open.
`RANKER_TEST_CLOSED` is touched when the lifespan has closed; the process then waits (at most
30 s) for `RANKER_TEST_RELEASE` to exist before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from service.app import create_app_from_env


def create_app() -> FastAPI:
    app = create_app_from_env()
    inner = app.router.lifespan_context
    closed = Path(os.environ["RANKER_TEST_CLOSED"])
    release = Path(os.environ["RANKER_TEST_RELEASE"])

    @contextlib.asynccontextmanager
    async def lingering(a: FastAPI) -> AsyncIterator[Any]:
        async with inner(a) as state:
            yield state
        closed.touch()
        end = time.monotonic() + 30
        while not release.exists() and time.monotonic() < end:
            await asyncio.sleep(0.05)  # poll interval of a bounded wait

    app.router.lifespan_context = lingering
    return app
