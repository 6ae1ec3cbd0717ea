"""POST /rank: read the request, run the ranking pipeline (`service.pipeline`), answer."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.errors import Forbidden
from service.experiments import FORCE_HEADER
from service.middleware.auth import admin_key_of, key_matches, parse_keys
from service.openapi import FORCE_ARM_PARAMETERS
from service.schemas import ErrorResponse, RankRequest, RankResponse
from service.state import PipelineDep

router = APIRouter()


def forced_arm(request: Request, admin_key: str | None) -> str | None:
    """The `X-Ranker-Arm` value when the request presents the admin key; 403 otherwise."""
    value = request.headers.get(FORCE_HEADER)
    if value is None:
        return None
    if not key_matches(admin_key_of(request.scope), parse_keys([admin_key] if admin_key else None)):
        raise Forbidden(f"{FORCE_HEADER} needs the admin key (X-Admin-Key)"
                        + ("" if admin_key else "; none is configured (RANKER_ADMIN_API_KEY)"))
    return value


@router.post(
    "/rank",
    response_model=None,
    responses={200: {"model": RankResponse}, 403: {"model": ErrorResponse},
               413: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
               503: {"model": ErrorResponse}},
    openapi_extra={"parameters": FORCE_ARM_PARAMETERS},
)
async def rank(req: RankRequest, pipeline: PipelineDep, request: Request) -> Response:
    """Rank the candidates for the user with per-request task weights (an experiment's arm,
    when the user is in one, decides what it sets)."""
    forced = forced_arm(request, pipeline.settings.admin_api_key)
    body = await pipeline.rank(req, request.state.request_id, forced)
    return Response(body, media_type="application/json")
