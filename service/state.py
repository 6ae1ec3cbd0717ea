"""What the lifespan owns, and the `Annotated` dependency aliases routes use to reach it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import redis.asyncio as aredis
from fastapi import Depends, Request
from redis.asyncio.cluster import RedisCluster

from service.pipeline import RankingPipeline, Serving
from service.registry import ModelRegistry
from service.settings import Settings

if TYPE_CHECKING:
    from service.arms import Arms

RedisClient = aredis.Redis | RedisCluster


@dataclass
class AppState:
    """Per-app resources: opened in the lifespan (`service.lifespan`), closed when it ends."""

    settings: Settings
    registry: ModelRegistry
    executor: ThreadPoolExecutor
    pipeline: RankingPipeline
    client: RedisClient | None = None  # the shared Redis client (None without redis_url)
    last_reload: dict[str, Any] = field(default_factory=dict)
    arms: Arms | None = None  # the experiments file in force (None without one)

    @property
    def serving(self) -> Serving | None:
        """The model being served and its feature store view (the pipeline's)."""
        return self.pipeline.serving


# async on purpose: FastAPI runs plain `def` dependencies in its threadpool (a thread hop
# per request on the hot path)
async def get_state(request: Request) -> AppState:
    return request.app.state.ranker


async def get_pipeline(request: Request) -> RankingPipeline:
    return request.app.state.ranker.pipeline


StateDep = Annotated[AppState, Depends(get_state)]
PipelineDep = Annotated[RankingPipeline, Depends(get_pipeline)]
