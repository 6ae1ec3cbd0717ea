"""Request and response bodies of the API.

Structural limits (types, lengths, finiteness, valid Unicode) are checked by pydantic here;
weights, `top_k` and `explain` are strict (a JSON number or boolean, never a string that looks
like one). Limits that come from configuration or the serving model (candidate count, weight
bounds, task names, presets, dense context features) are checked in `service.validation`, so
both yield the same 422 shape, and stated in the OpenAPI schema by `service.openapi`.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    Strict,
)
from pydantic_core import PydanticCustomError

MAX_ID_LENGTH = 256
MAX_CONTEXT_KEYS = 64
MAX_WEIGHT_KEYS = 64
MAX_KEY_LENGTH = 64
INT_BOUNDS = (-(2**53), 2**53)  # context integers: exact in every JSON parser


def valid_text(value: str) -> str:
    """Refuse a string that is not valid Unicode (a lone surrogate, e.g. from a `\\ud800`
    escape): it could not be written back as UTF-8, in the answer or in a Redis key."""
    try:
        value.encode()
    except UnicodeEncodeError as e:
        raise PydanticCustomError(
            "string_unicode", "not valid Unicode text (a lone surrogate at position {pos})",
            {"pos": e.start}) from None
    return value


def context_value(value: object) -> str | int | float | bool | None:
    """A context value: valid text, an integer within ±2^53, a finite number, a boolean or
    null."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return valid_text(value)
    if isinstance(value, int):
        if not INT_BOUNDS[0] <= value <= INT_BOUNDS[1]:
            raise PydanticCustomError("int_range", "integer outside ±2^53")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PydanticCustomError(
                "finite_number", "must be a finite number (NaN and infinity are not accepted)")
        return value
    raise PydanticCustomError("context_type", "must be a string, number, boolean or null")


def integral(value: object) -> object:
    """A float with no fraction as the integer it is (JSON Schema counts 3.0 as an integer);
    everything else unchanged, for the strict integer check after it."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


ItemId = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
Key = Annotated[str, Field(min_length=1, max_length=MAX_KEY_LENGTH), AfterValidator(valid_text)]
# strict: a weight (or a re-rank factor) must be a JSON number (an integer is one), never "1"
# or true
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Weight = Number
ContextValue = Annotated[
    str | int | float | bool | None,
    PlainValidator(context_value, json_schema_input_type=(
        Annotated[str, Field(max_length=MAX_ID_LENGTH)]
        | Annotated[int, Field(ge=INT_BOUNDS[0], le=INT_BOUNDS[1])] | float | bool | None)),
]


AttributeName = Key
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
    seen: Annotated[bool, Strict()] = False


class BoostRule(BaseModel):
    """Final score times a factor: per categorical value, or per bucket of a dense value."""

    model_config = ConfigDict(extra="forbid")

    attribute: AttributeName
    values: Annotated[dict[Key, Number], Field(max_length=1000)] | None = None
    edges: Annotated[list[Number], Field(min_length=1, max_length=64)] | None = None
    factors: Annotated[list[Number], Field(min_length=2, max_length=65)] | None = None


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
    weights: Annotated[dict[Key, Weight], Field(max_length=MAX_WEIGHT_KEYS)] | None = None
    preset: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    scoring: Literal["weighted_sum", "weighted_product"] | None = None
    context: Annotated[dict[Key, ContextValue], Field(max_length=MAX_CONTEXT_KEYS)] | None = None
    top_k: Annotated[int, BeforeValidator(integral), Strict(), Field(ge=1)] | None = None
    explain: Annotated[bool, Strict()] = False
    rerank: RerankSpec | None = Field(
        default=None, description="re-rank rules after scoring: a preset and/or overrides")


class ModelRef(BaseModel):
    name: str
    version: int


class RerankedFrom(BaseModel):
    """With explain: the item's position in the plain score order of the candidates the filters
    kept, and the rules that moved it."""

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
    experiment: str | None = Field(default=None, description="the experiment the user is in "
                                   "(absent when none applies)")
    arm: str | None = Field(default=None, description="the arm that served this response "
                            "(absent when no experiment applies)")
    forced: bool | None = Field(default=None, description="true when the arm was forced by "
                                "the X-Ranker-Arm header (QA; absent otherwise)")


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    error: str
    message: str | None = None
    detail: list[ErrorDetail] | None = None
    request_id: str | None = None


# ---- POST /feedback (service/routes/feedback.py) --------------------------------------------

FeedbackId = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH),
                      AfterValidator(valid_text)]
EventName = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(valid_text)]
# strict, as a weight: a JSON number (an integer is one), never "1700000000"
UnixTime = Annotated[float, Strict(), Field(allow_inf_nan=False)]


class FeedbackEventIn(BaseModel):
    """What a user did with a served item: the /rank request id, the item, the task, when."""

    model_config = ConfigDict(extra="forbid")

    request_id: FeedbackId = Field(description="the request_id of the /rank answer")
    item_id: FeedbackId
    event: EventName = Field(description="one of the serving model's tasks (GET /model)")
    ts: UnixTime = Field(description="unix seconds when it happened")


class FeedbackRequest(BaseModel):
    """POST /feedback body: 1..feedback_max_events events."""

    model_config = ConfigDict(extra="forbid")

    events: list[FeedbackEventIn]


class FeedbackAccepted(BaseModel):
    """POST /feedback answer (202): events taken; those the log could not keep are counted in
    `dropped` (best effort: a full queue or Redis down never fails the request)."""

    accepted: int
    dropped: int = 0
