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


class ModelRef(BaseModel):
    name: str
    version: int


class RankedItem(BaseModel):
    id: str
    score: float
    scores: dict[str, float]
    gates: list[list[float]] | None = Field(
        default=None, description="with explain: gate weight per task (tasks order) per expert"
    )


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


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    error: str
    message: str | None = None
    detail: list[ErrorDetail] | None = None
    request_id: str | None = None


# ---- POST /feedback (service/routes/feedback.py) --------------------------------------------

RequestId = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
EventName = Annotated[str, Field(min_length=1, max_length=64)]


class FeedbackEventIn(BaseModel):
    """What a user did with a served item: the /rank request id, the item, the task, when."""

    model_config = ConfigDict(extra="forbid")

    request_id: RequestId = Field(description="the request_id of the /rank answer")
    item_id: ItemId
    event: EventName = Field(description="one of the serving model's tasks (GET /model)")
    ts: FiniteFloat = Field(description="unix seconds when it happened")


class FeedbackRequest(BaseModel):
    """POST /feedback body: 1..feedback_max_events events."""

    model_config = ConfigDict(extra="forbid")

    events: list[FeedbackEventIn]


class FeedbackAccepted(BaseModel):
    """POST /feedback answer (202): events taken; those the log could not keep are counted in
    `dropped` (best effort: a full queue or Redis down never fails the request)."""

    accepted: int
    dropped: int = 0
