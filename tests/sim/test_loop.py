"""The HTTP loop against an in-process fake server (httpx.MockTransport): what it sends to
/rank and /feedback, and how it counts answers it cannot use. The real server is in
test_serve.py; this covers a /feedback that accepts (main has no such route yet)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from sim.core import PositionModel
from sim.run import SimConfig, simulate
from training.synthetic import World

WEIGHTS = {"click": 1.0, "like": 4.0, "share": 8.0}


class FakeServer:
    """Ranks candidates in the order given (or breaks on purpose); /feedback answers 202."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.rank_bodies: list[dict[str, Any]] = []
        self.feedback_bodies: list[dict[str, Any]] = []
        self.keys: set[str | None] = set()
        self.served: dict[str, list[str]] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.keys.add(request.headers.get("x-api-key"))
        body = json.loads(request.content)
        if request.url.path == "/feedback":
            self.feedback_bodies.append(body)
            return httpx.Response(202, json={"accepted": len(body["events"])})
        self.rank_bodies.append(body)
        rid = f"r{len(self.rank_bodies)}"
        items = body["candidates"][: body["top_k"]]
        if self.mode == "foreign":  # an item of the world that was not a candidate
            items = [next(f"i{k}" for k in range(10**4) if f"i{k}" not in body["candidates"]),
                     *items[1:]]
        if self.mode == "unknown":  # an id of no item of the world
            items = ["i9999", *items[1:]]
        if self.mode == "garbage":
            return httpx.Response(200, content=b"not json")
        self.served[rid] = items
        return httpx.Response(200, json={
            "request_id": rid, "model": {"name": "fake", "version": 3},
            "tasks": ["click", "like", "share"], "scoring": "weighted_sum",
            "weights": body.get("weights") or {"click": 1.0, "like": 1.0, "share": 1.0},
            "items": [{"id": i, "score": 0.0, "scores": {}} for i in items]})


def run(world: World, server: FakeServer, requests: int = 60, **kw: Any) -> dict[str, Any]:
    from sim.run import summary

    cfg = SimConfig(requests=requests, candidates=30, seed=4, concurrency=3, api_key="k1",
                    weights=WEIGHTS, **kw)
    pm = PositionModel(top_k=6, eta=0.5)
    result = asyncio.run(simulate(world, "http://fake", cfg, pm,
                                  transport=httpx.MockTransport(server)))
    return summary(result, cfg, pm, "http://fake")


def test_feedback_batches_carry_the_drawn_events_of_each_response(world: World) -> None:
    server = FakeServer()
    s = run(world, server)
    assert s["rank_status"] == {"200": 60} and s["model_versions"] == {"fake/3": 60}
    assert server.keys == {"k1"}  # the same X-API-Key on /rank and /feedback
    body = server.rank_bodies[0]
    assert set(body) == {"user_id", "candidates", "context", "top_k", "weights"}
    assert body["top_k"] == 6 and body["weights"] == WEIGHTS and len(body["candidates"]) == 30
    events = [e for b in server.feedback_bodies for e in b["events"]]
    assert len(server.feedback_bodies) == s["feedback"]["batches"] == s["feedback"]["status"]["202"]
    assert s["feedback"]["supported"] and s["feedback"]["accepted_events"] == len(events)
    assert len(events) == sum(s["events"].values()) > 0
    for b in server.feedback_bodies:
        assert len({e["request_id"] for e in b["events"]}) == 1  # one batch per response
    for e in events:
        assert set(e) == {"request_id", "item_id", "event", "ts"}
        assert e["item_id"] in server.served[e["request_id"]]
        assert e["event"] in ("click", "like", "share") and isinstance(e["ts"], float)
    assert s["impressions"] == 60 * 6
    assert {t: sum(e["event"] == t for e in events) for t in WEIGHTS} == s["events"]


def test_answers_it_cannot_use_are_counted_as_problems(world: World) -> None:
    for mode in ("foreign", "unknown", "garbage"):
        s = run(world, FakeServer(mode), requests=10)
        assert s["rank_status"] == {"200": 10}, mode
        assert s["problems_total"] == 10 and s["impressions"] == 0, (mode, s["problems"])
        assert s["feedback"]["batches"] == 0
    assert "not candidates" in run(world, FakeServer("foreign"), requests=1)["problems"][0]
    assert "'i9999'" in run(world, FakeServer("unknown"), requests=1)["problems"][0]
