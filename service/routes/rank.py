"""POST /rank: read the request, run the ranking pipeline (`service.pipeline`), answer."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.schemas import ErrorResponse, RankRequest, RankResponse
from service.state import PipelineDep

router = APIRouter()


@router.post(
    "/rank",
    response_model=None,
    responses={200: {"model": RankResponse}, 413: {"model": ErrorResponse},
               422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def rank(req: RankRequest, pipeline: PipelineDep, request: Request) -> Response:
    """Rank the candidates for the user with per-request task weights."""
    body = await pipeline.rank(req, request.state.request_id)
    return Response(body, media_type="application/json")
