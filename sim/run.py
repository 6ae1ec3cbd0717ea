"""The HTTP loop of `ranker simulate`: C asyncio workers, bounded in requests and in time.

Each worker takes the next request number, sends its POST /rank, evaluates the answer with
`sim.core.evaluate` and sends the drawn events as one POST /feedback batch. A 404 from
/feedback is counted ("feedback not supported by this server"), not an error.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx

from sim.core import Plan, Population, PositionModel, Tally, evaluate, plan_request
from training.synthetic import World


@dataclass(frozen=True)
class SimConfig:
    """One bounded run: at most `requests` requests, stopping after `max_seconds`."""

    requests: int
    candidates: int = 100
    users: int | None = None
    seed: int = 0
    concurrency: int = 4
    max_seconds: float = 60.0
    # per HTTP call: a request in flight at max_seconds finishes its /rank and /feedback calls,
    # so a run lasts at most max_seconds + 2 * timeout_s
    timeout_s: float = 10.0
    weights: dict[str, float] | None = None
    api_key: str | None = None


@dataclass
class RunResult:
    tally: Tally
    elapsed_s: float
    stopped_by: str  # "requests" | "time"


async def _rank_and_feedback(client: httpx.AsyncClient, world: World, plan: Plan,
                             cfg: SimConfig, position: PositionModel, tally: Tally) -> None:
    try:
        r = await client.post("/rank", json=plan.body(position.top_k, cfg.weights))
    except httpx.HTTPError as e:
        tally.rank_status[type(e).__name__] += 1
        return
    tally.rank_status[str(r.status_code)] += 1
    if r.status_code != 200:
        tally.problem(f"#{plan.index}: /rank {r.status_code}: {r.text[:200]}")
        return
    try:
        body: dict[str, Any] = r.json()
        model = body["model"]
        tally.model_versions[f"{model['name']}/{model['version']}"] += 1
        served = world.item_index([it["id"] for it in body["items"]]).reshape(-1)
        weights = {str(k): float(v) for k, v in body["weights"].items()}
        outcome = evaluate(world, plan, served, weights, body.get("scoring", "weighted_sum"),
                           position, cfg.seed)
    except (KeyError, ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        tally.problem(f"#{plan.index}: unusable /rank answer: {e!r}")
        return
    tally.add(outcome, weights)
    if not outcome.events:
        return
    now = time.time()
    events = [{"request_id": body["request_id"], "item_id": f"i{item}", "event": task, "ts": now}
              for item, task in outcome.events]
    try:
        fr = await client.post("/feedback", json={"events": events})
    except httpx.HTTPError as e:
        tally.feedback_status[type(e).__name__] += 1
        return
    tally.feedback_status[str(fr.status_code)] += 1
    if fr.status_code == 202:
        tally.feedback_events += len(events)
    elif fr.status_code != 404:
        tally.problem(f"#{plan.index}: /feedback {fr.status_code}: {fr.text[:200]}")


async def simulate(world: World, base_url: str, cfg: SimConfig, position: PositionModel,
                   transport: httpx.AsyncBaseTransport | None = None) -> RunResult:
    """Run the simulated users against `base_url` (the caller checked it is loopback).

    `transport` replaces the network (tests: an in-process fake of the server's answers).
    """
    population = Population.draw(world, cfg.users, cfg.seed)
    tally = Tally()
    counter = iter(range(cfg.requests))
    t0 = time.monotonic()
    stop_at = t0 + cfg.max_seconds
    headers = {"X-API-Key": cfg.api_key} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency,
                          max_keepalive_connections=cfg.concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            i = next(counter, None)
            if i is None:
                return
            tally.requests += 1
            plan = plan_request(world, population, i, cfg.seed, cfg.candidates)
            await _rank_and_feedback(client, world, plan, cfg, position, tally)

    async with httpx.AsyncClient(base_url=base_url, timeout=cfg.timeout_s, limits=limits,
                                 headers=headers, trust_env=False,
                                 transport=transport) as client:
        await asyncio.gather(*(worker(client) for _ in range(cfg.concurrency)))
    elapsed = time.monotonic() - t0
    return RunResult(tally, elapsed, "requests" if tally.requests == cfg.requests else "time")


def summary(result: RunResult, cfg: SimConfig, position: PositionModel,
            base_url: str) -> dict[str, Any]:
    """The run's summary: the tally's, plus what was run and how it stopped."""
    out = result.tally.summary()
    out["run"] = {"base_url": base_url, "requests_asked": cfg.requests,
                  "candidates": cfg.candidates, "users": cfg.users, "seed": cfg.seed,
                  "concurrency": cfg.concurrency, "max_seconds": cfg.max_seconds,
                  "weights": cfg.weights, "elapsed_s": round(result.elapsed_s, 3),
                  "stopped_by": result.stopped_by,
                  "requests_per_s": round(result.tally.requests / result.elapsed_s, 1)
                  if result.elapsed_s > 0 else None}
    out["position_model"] = position.describe()
    return out

