"""Request and response bodies of the API.

Structural limits (types, lengths, finiteness) are checked by pydantic here; limits that come
from configuration or the serving model (candidate count, weight bounds, task names, presets)
are checked in `service.validation`, so both yield the same 422 shape.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

ItemId = Annotated[str, Field(min_length=1, max_length=256)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
ContextValue = str | int | float | bool | None

MAX_ID_LENGTH = 256
MAX_CONTEXT_KEYS = 64
MAX_WEIGHT_KEYS = 64


AttributeName = Annotated[str, Field(min_length=1, max_length=64)]
MAX_PINS = 100
MAX_BOOSTS = 16
MAX_EXCLUDE = 10_000


class DiversityRule(BaseModel):
    """At most `max_per_window` items of one value of `attribute` in any `window` positions."""

    model_config = ConfigDict(extra="forbid")

    attribute: AttributeName
    max_per_window: Annotated[int, Field(ge=1)] = 1
    window: Annotated[int, Field(ge=2)]
    depth: Annotated[int, Field(ge=2)] | None = Field(
        default=None, description="positions the rule holds over (default: the setting "
        "rerank_diversity_depth, 50); below them the order is kept")


class MmrRule(BaseModel):
    """Maximal marginal relevance, similarity = same value of `attribute`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    attribute: AttributeName
    lambda_: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False, alias="lambda")] = 0.5


class FilterRule(BaseModel):
    """Ids never served: given here, and/or the user's seen set in the feature store."""

    model_config = ConfigDict(extra="forbid")

    exclude: Annotated[list[ItemId], Field(max_length=MAX_EXCLUDE)] = []
    seen: bool = False


class BoostRule(BaseModel):
    """Final score times a factor: per categorical value, or per bucket of a dense value."""

    model_config = ConfigDict(extra="forbid")

    attribute: AttributeName
    values: Annotated[dict[str, FiniteFloat], Field(max_length=1000)] | None = None
    edges: Annotated[list[FiniteFloat], Field(min_length=1, max_length=64)] | None = None
    factors: Annotated[list[FiniteFloat], Field(min_length=2, max_length=65)] | None = None


class PinRule(BaseModel):
    """Serve candidate `id` at `position` (0 = first)."""

    model_config = ConfigDict(extra="forbid")

    id: ItemId
    position: Annotated[int, Field(ge=0)]


class RerankSpec(BaseModel):
    """The `rerank` field: a preset of the rules file, overlaid section by section (a section
    set to null turns the preset's off)."""

    model_config = ConfigDict(extra="forbid")

    preset: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    diversity: DiversityRule | None = None
    mmr: MmrRule | None = None
    filters: FilterRule | None = None
    boosts: Annotated[list[BoostRule], Field(max_length=MAX_BOOSTS)] | None = None
    pins: Annotated[list[PinRule], Field(max_length=MAX_PINS)] | None = None


class RankRequest(BaseModel):
    """POST /rank body."""

    model_config = ConfigDict(extra="forbid")

    user_id: Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
    candidates: list[ItemId] = Field(description="item ids to rank; unique")
    weights: Annotated[dict[str, FiniteFloat], Field(max_length=MAX_WEIGHT_KEYS)] | None = None
    preset: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    scoring: Literal["weighted_sum", "weighted_product"] | None = None
    context: Annotated[dict[str, ContextValue], Field(max_length=MAX_CONTEXT_KEYS)] | None = None
    top_k: Annotated[int, Field(ge=1)] | None = None
    explain: bool = False
    rerank: RerankSpec | None = Field(
        default=None, description="re-rank rules after scoring: a preset and/or overrides")


class ModelRef(BaseModel):
    name: str
    version: int


class RerankedFrom(BaseModel):
    """With explain: the item's position in the plain score order and the rules that moved it."""

    from_: int = Field(alias="from")
    rules: list[str]


class RerankSummary(BaseModel):
    """What the re-rank stage did (only when rules apply)."""

    preset: str | None
    applied: list[str] = Field(description="rules that changed something, in the order they ran")
    filtered: int
    relaxed: list[dict[str, object]]
    adjusted: list[str] = Field(description="preset values fitted to this request")


class RankedItem(BaseModel):
    id: str
    score: float
    scores: dict[str, float]
    gates: list[list[float]] | None = Field(
        default=None, description="with explain: gate weight per task (tasks order) per expert"
    )
    rerank: RerankedFrom | None = Field(
        default=None, description="with explain and re-rank rules: where the item came from")


class Defaulted(BaseModel):
    user: int
    items: int
    stale: int = 0


class RankResponse(BaseModel):
    """POST /rank response (documentation; the body is serialised with orjson)."""

    request_id: str
    model: ModelRef
    tasks: list[str]
    scoring: str
    weights: dict[str, float]
    items: list[RankedItem]
    defaulted: Defaulted
    degraded: bool
    degraded_reason: str | None = None
    rerank: RerankSummary | None = None


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    error: str
    message: str | None = None
    detail: list[ErrorDetail] | None = None
    request_id: str | None = None
