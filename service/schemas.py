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
# strict: a weight must be a JSON number (an integer is one), never "1" or true
Weight = Annotated[float, Strict(), Field(allow_inf_nan=False)]
ContextValue = Annotated[
    str | int | float | bool | None,
    PlainValidator(context_value, json_schema_input_type=(
        Annotated[str, Field(max_length=MAX_ID_LENGTH)]
        | Annotated[int, Field(ge=INT_BOUNDS[0], le=INT_BOUNDS[1])] | float | bool | None)),
]


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
