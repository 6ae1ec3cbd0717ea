"""What the lifespan owns, and the `Annotated` dependency aliases routes use to reach it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from service.registry import LoadedModel, ModelRegistry
from service.settings import Settings


@dataclass(frozen=True)
class Serving:
    """The model being served and the feature store view for its schema: swapped as one object."""

    model: LoadedModel
    store: Any  # service.featurestore.reader.FeatureStore, or None without Redis


@dataclass
class AppState:
    """Per-app resources: created in the lifespan, closed when it ends."""

    settings: Settings
    registry: ModelRegistry
    executor: ThreadPoolExecutor
    client: Any = None  # the shared Redis client (None when no redis_url is configured)
    serving: Serving | None = None
    last_reload: dict[str, Any] = field(default_factory=dict)


# async on purpose: FastAPI runs plain `def` dependencies in its threadpool (a thread hop
# per request on the hot path)
async def get_state(request: Request) -> AppState:
    return request.app.state.ranker


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.ranker.settings


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
