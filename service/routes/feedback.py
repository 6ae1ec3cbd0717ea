"""POST /feedback: read the events, hand them to `service.servedlog.feedback`, answer 202."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from starlette.responses import Response

from service.schemas import ErrorResponse, FeedbackAccepted, FeedbackRequest
from service.servedlog.feedback import take_feedback
from service.state import StateDep

router = APIRouter()


@router.post(
    "/feedback",
    status_code=202,
    response_model=None,
    responses={202: {"model": FeedbackAccepted}, 401: {"model": ErrorResponse},
               413: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
               503: {"model": ErrorResponse}},
)
async def feedback(req: FeedbackRequest, state: StateDep) -> Response:
    """Record what users did with served items (events named by the serving model's tasks)."""
    answer = take_feedback(req, state.settings, state.serving, state.pipeline.log)
    return Response(orjson.dumps(answer.model_dump()), status_code=202,
                    media_type="application/json")
