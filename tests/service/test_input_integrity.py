"""Every bad input is a 422 naming the field, never a 500 or a silent coercion (issue 14, items
5-7): lone surrogates wherever text is taken, dense context values that are not numbers,
strict types for weights, top_k and explain, and an OpenAPI schema that states every limit."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest

from service.app import create_app
from tests.service.helpers import load_features, metric, running_app
from tests.service.variants import DENSE_CONTEXT
from tests.support import settings_for
from tests.tiny import MODEL_NAME

pytestmark = pytest.mark.asyncio

OK = '"user_id": "u1", "candidates": ["i1", "i2", "i3"]'
JSON = {"content-type": "application/json"}


@pytest.fixture
async def client(model_repo: Path, redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    load_features(redis_url, model_repo / MODEL_NAME / "1")
    async with running_app(settings_for(model_repo, redis_url, max_candidates=50)) as c:
        yield c


@pytest.fixture
async def dense_client(dense_context_models: Path, tmp_path: Path,
                       redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    repo = tmp_path / "models"
    shutil.copytree(dense_context_models, repo)
    load_features(redis_url, repo / MODEL_NAME / "1")
    async with running_app(settings_for(repo, redis_url, max_candidates=50)) as c:
        yield c


async def post_raw(client: httpx.AsyncClient, body: str, **headers: str) -> httpx.Response:
    """POST /rank with exactly this JSON text (escapes such as \\ud800 reach the parser)."""
    return await client.post("/rank", content=body.encode(), headers={**JSON, **headers})


def refused(r: httpx.Response, field: str) -> None:
    """A 422 invalid_request whose detail names `field`, in a body that is valid UTF-8 JSON."""
    assert r.status_code == 422, r.text
    body = orjson.loads(r.content)  # raises on bytes that are not UTF-8
    assert body["error"] == "invalid_request", body
    fields = [d["field"] for d in body["detail"]]
    assert any(f == field or f.startswith(field + ".") for f in fields), (field, body)


# a lone surrogate wherever the request carries text; \ud800 is legal JSON that Python decodes
# to a str orjson refuses to write (today: a 500 on a weight key, a silent 200 in the context)
SURROGATES = [
    ('"weights": {"\\ud800": 1}', "weights"),
    ('"weights": {"\\ud800": "x"}', "weights"),
    ('"context": {"\\ud800": 1}', "context"),
    ('"context": {"hour": "\\ud800"}', "context.hour"),
    ('"context": {"surface": "home\\udfff"}', "context.surface"),
    ('"preset": "\\ud800"', "preset"),
    ('"scoring": "\\ud800"', "scoring"),
]


@pytest.mark.parametrize(("extra", "field"), SURROGATES)
async def test_lone_surrogates_are_422_naming_the_field(client, extra, field):
    invalid = metric("ranker_rejected_requests_total", {"reason": "invalid"})
    refused(await post_raw(client, "{" + OK + ", " + extra + "}"), field)
    assert metric("ranker_rejected_requests_total", {"reason": "invalid"}) == invalid + 1


@pytest.mark.parametrize(("body", "field"), [
    ('{"user_id": "\\ud800", "candidates": ["i1"]}', "user_id"),
    ('{"user_id": "u1", "candidates": ["i1", "\\udc00x"]}', "candidates[1]"),
])
async def test_lone_surrogates_in_ids_are_422(client, body, field):
    refused(await post_raw(client, body), field)


async def test_a_request_id_that_is_not_plain_is_replaced_not_echoed(client):
    r = await client.post("/rank", content=("{" + OK + "}").encode(),
                          headers=[(b"content-type", b"application/json"),
                                   (b"x-request-id", b"\xed\xa0\x80\xff")])
    assert r.status_code == 200, r.text
    rid = r.json()["request_id"]
    assert rid.isascii() and len(rid) == 32 and r.headers["x-request-id"] == rid


@pytest.mark.parametrize("value", [
    '"abc"', '"21"', '"inf"', '"nan"', "1" + "0" * 400, "-1e31", "true", "[1]", "NaN",
    "Infinity",
])
async def test_dense_context_values_that_are_not_finite_numbers_are_422(dense_client, value):
    # today: "abc" and the 400-digit integer raise in the encoder (500), "inf" passes through
    # as a non-finite model input
    r = await post_raw(dense_client, "{" + OK + f', "context": {{"{DENSE_CONTEXT}": {value}}}}}')
    refused(r, f"context.{DENSE_CONTEXT}")


@pytest.mark.parametrize("value", ["21.5", "-3", "null", "1e30"])
async def test_dense_context_numbers_rank(dense_client, value):
    r = await post_raw(dense_client, "{" + OK + f', "context": {{"{DENSE_CONTEXT}": {value}}}}}')
    assert r.status_code == 200, r.text
    assert len(r.json()["items"]) == 3


async def test_dense_context_value_changes_the_scores(dense_client):
    """The value really reaches the model (so refusing bad ones is not refusing a no-op)."""
    bodies = [(await post_raw(dense_client, "{" + OK + f', "context": {{"{DENSE_CONTEXT}": {v}}}}}'
                              )).json() for v in (0, 40)]
    assert [i["score"] for i in bodies[0]["items"]] != [i["score"] for i in bodies[1]["items"]]


@pytest.mark.parametrize(("extra", "field"), [
    ('"weights": {"click": "1"}', "weights.click"),
    ('"weights": {"click": true}', "weights.click"),
    ('"weights": {"click": [1]}', "weights.click"),
    ('"top_k": "3"', "top_k"),
    ('"top_k": 3.5', "top_k"),
    ('"top_k": true', "top_k"),
    ('"top_k": 51', "top_k"),
    ('"explain": "true"', "explain"),
    ('"explain": 1', "explain"),
    ('"context": {"hour": ' + "9" * 400 + "}", "context.hour"),
    ('"context": {"hour": NaN}', "context.hour"),
])
async def test_wrong_json_types_are_422_not_coerced(client, extra, field):
    # today every one of these is coerced and ranked (200)
    refused(await post_raw(client, "{" + OK + ", " + extra + "}"), field)


async def test_integer_weights_are_still_numbers(client):
    # and top_k 2.0 is an integer (as JSON Schema, and so every generated client, counts it)
    r = await post_raw(client, "{" + OK + ', "weights": {"click": 2, "like": 0}, "top_k": 2.0}')
    assert r.status_code == 200, r.text
    assert r.json()["weights"] == {"click": 2.0, "like": 0.0, "share": 1.0}
    assert len(r.json()["items"]) == 2


async def test_openapi_states_every_enforced_limit(model_repo, redis_url):
    settings = settings_for(model_repo, redis_url, max_candidates=37, weight_min=0.5,
                            weight_max=50.0, presets={"fresh": {"click": 1.0}})
    async with running_app(settings) as c:
        schema = (await c.get("/openapi.json")).json()
    req = schema["components"]["schemas"]["RankRequest"]["properties"]

    def branch(prop: dict) -> dict:
        return next(b for b in prop.get("anyOf", [prop]) if b.get("type") != "null")

    cands = req["candidates"]
    assert (cands["minItems"], cands["maxItems"], cands["uniqueItems"]) == (1, 37, True)
    assert (cands["items"]["minLength"], cands["items"]["maxLength"]) == (1, 256)
    assert (req["user_id"]["minLength"], req["user_id"]["maxLength"]) == (1, 256)
    weights = branch(req["weights"])
    assert weights["additionalProperties"] == {"type": "number", "minimum": 0.5, "maximum": 50.0}
    assert weights["propertyNames"] == {"enum": ["click", "like", "share"]}  # the model's tasks
    assert branch(req["preset"])["enum"] == ["fresh"]
    top_k = branch(req["top_k"])
    assert (top_k["type"], top_k["minimum"], top_k["maximum"]) == ("integer", 1, 37)
    assert req["explain"]["type"] == "boolean"
    context_ints = [b for b in branch(req["context"])["additionalProperties"]["anyOf"]
                    if b.get("type") == "integer"]
    assert context_ints == [{"type": "integer", "minimum": -(2**53), "maximum": 2**53}]
    for path in ("/admin/pin", "/admin/unpin"):
        assert "403" in schema["paths"][path]["post"]["responses"]


async def test_openapi_states_the_models_dense_context(dense_client):
    schema = (await dense_client.get("/openapi.json")).json()
    ctx = schema["components"]["schemas"]["RankRequest"]["properties"]["context"]["anyOf"][0]
    number = ctx["properties"][DENSE_CONTEXT]["anyOf"][0]
    assert number == {"type": "number", "minimum": -1e30, "maximum": 1e30}


async def test_openapi_before_any_model_still_states_the_settings_limits(tmp_path):
    app = create_app(settings_for(tmp_path, None, max_candidates=9))
    props = app.openapi()["components"]["schemas"]["RankRequest"]["properties"]
    assert props["candidates"]["maxItems"] == 9
