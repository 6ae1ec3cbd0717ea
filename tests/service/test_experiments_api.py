"""Experiments on /rank: the real app factory and lifespan, real tiny models, a real Redis."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from ranker.servedlog import decode_served, served_stream
from service.app import create_app
from service.experiments import ExperimentsError, unit_hash
from tests.service.experiments_files import CONTROL, TREATMENT, canary_toml, experiments_toml
from tests.service.helpers import load_features, metric, running_app
from tests.support import settings_for
from tests.tiny import MODEL_NAME, install_version

pytestmark = pytest.mark.asyncio

CANDS = [f"i{i}" for i in range(20)]
ADMIN = "admin-secret"

AB = experiments_toml("v2-vs-v1", "s1", [CONTROL, TREATMENT | {
    "weights": {"click": 1.0, "like": 0.0, "share": 0.0}}])


@pytest.fixture
def repo2(model_repo: Path, pristine_models: Path) -> Path:
    install_version(pristine_models, model_repo, 2)
    return model_repo


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def settings(repo: Path, redis_url: str, exp_file: Path | None, **kw: object):
    return settings_for(repo, redis_url, experiments_file=exp_file, admin_api_key=ADMIN,
                        experiments_poll_s=0.05, model_version=1, **kw)


async def rank(c: httpx.AsyncClient, user: str = "u1", headers: dict | None = None,
               status: int = 200, **payload: object) -> dict:
    r = await c.post("/rank", json={"user_id": user, "candidates": CANDS, **payload},
                     headers=headers or {})
    assert r.status_code == status, r.text
    return r.json()


def arm_of(user: str) -> str:
    return "control" if unit_hash("s1", user) < 0.5 else "treatment"


async def wait_for(cond, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_arms_serve_their_versions_and_overrides(repo2, redis_url, tmp_path):
    load_features(redis_url, repo2 / MODEL_NAME / "1")
    f = write(tmp_path / "exp.toml", AB)
    async with running_app(settings(repo2, redis_url, f)) as c:
        users = [f"u{i}" for i in range(10)]
        for u in users:
            body = await rank(c, u, weights={"click": 1.0, "like": 5.0, "share": 5.0})
            want = arm_of(u)
            assert (body["experiment"], body["arm"]) == ("v2-vs-v1", want)
            assert "forced" not in body
            assert body["model"]["version"] == (1 if want == "control" else 2)
            if want == "treatment":  # the arm's weights win over the request's
                assert body["weights"] == {"click": 1.0, "like": 0.0, "share": 0.0}
            else:
                assert body["weights"] == {"click": 1.0, "like": 5.0, "share": 5.0}
            again = await rank(c, u)
            assert again["arm"] == want  # sticky
        assert {arm_of(u) for u in users} == {"control", "treatment"}
        assert metric("ranker_arm_requests_total", {"experiment": "v2-vs-v1", "arm": "treatment",
                                                    "outcome": "ok", "forced": "false"}) > 0
        info = (await c.get("/model")).json()
        loaded = {(v["name"], v["version"]) for v in info["loaded_versions"]}
        assert loaded == {(MODEL_NAME, 1), (MODEL_NAME, 2)}
        assert all(v["memory_bytes"] is not None for v in info["loaded_versions"])
        exp = info["experiments"]["experiments"][0]
        assert [a["share"] for a in exp["arms"]] == [0.5, 0.5]
        assert metric("ranker_model_memory_bytes", {"name": MODEL_NAME, "version": "2"}) >= 0


async def test_default_response_is_byte_identical_without_an_experiment(repo2, redis_url,
                                                                        tmp_path):
    load_features(redis_url, repo2 / MODEL_NAME / "1")
    # an experiment covering a slice of users this one is outside of
    user = next(f"x{i}" for i in range(1000) if unit_hash("traffic", f"x{i}") >= 0.5)
    f = write(tmp_path / "exp.toml", AB.replace('salt = "s1"', 'salt = "s1"\ntraffic = [0, 0.5]'))
    bodies = []
    for exp_file in (None, f):
        async with running_app(settings(repo2, redis_url, exp_file)) as c:
            r = await c.post("/rank", json={"user_id": user, "candidates": CANDS},
                             headers={"X-Request-ID": "same-id"})
            assert r.status_code == 200, r.text
            bodies.append(r.content)
    assert bodies[0] == bodies[1]


async def test_forced_arm_needs_the_admin_key(repo2, redis_url, tmp_path):
    load_features(redis_url, repo2 / MODEL_NAME / "1")
    f = write(tmp_path / "exp.toml", AB)
    user = next(f"u{i}" for i in range(10) if arm_of(f"u{i}") == "control")
    async with running_app(settings(repo2, redis_url, f)) as c:
        h = {"X-Ranker-Arm": "v2-vs-v1/treatment"}
        body = await rank(c, user, headers=h, status=403)
        assert body["error"] == "forbidden"
        await rank(c, user, headers={**h, "X-Admin-Key": "wrong"}, status=403)
        body = await rank(c, user, headers={**h, "X-Admin-Key": ADMIN})
        assert (body["arm"], body["forced"], body["model"]["version"]) == ("treatment", True, 2)
        bad = await rank(c, user, headers={"X-Ranker-Arm": "v2-vs-v1/nope",
                                           "X-Admin-Key": ADMIN}, status=422)
        assert "no arm 'nope'" in bad["message"]
        assert metric("ranker_arm_requests_total", {"experiment": "v2-vs-v1", "arm": "treatment",
                                                    "outcome": "ok", "forced": "true"}) >= 1
        # the header and the key it needs are in the API description
        op = (await c.get("/openapi.json")).json()["paths"]["/rank"]["post"]
        headers = {p["name"].lower(): p for p in op["parameters"] if p["in"] == "header"}
        assert {"x-ranker-arm", "x-admin-key", "authorization"} <= set(headers)
        assert headers["x-ranker-arm"]["schema"]["enum"] == ["v2-vs-v1/control",
                                                             "v2-vs-v1/treatment"]
        assert {"403", "422"} <= set(op["responses"])


async def test_a_forced_arm_without_experiments_is_refused_not_ignored(repo2, redis_url):
    load_features(redis_url, repo2 / MODEL_NAME / "1")
    async with running_app(settings(repo2, redis_url, None)) as c:
        bad = await rank(c, headers={"X-Ranker-Arm": "v2-vs-v1/treatment", "X-Admin-Key": ADMIN},
                         status=422)
        assert "header.X-Ranker-Arm" in bad["message"], bad
        assert "no experiments are configured" in bad["message"], bad
        op = (await c.get("/openapi.json")).json()["paths"]["/rank"]["post"]
        assert "X-Ranker-Arm" not in {p["name"] for p in op["parameters"]}  # nothing to force


async def test_forced_rows_and_arms_reach_the_served_log(repo2, redis_url, tmp_path):
    import redis as redis_sync

    load_features(redis_url, repo2 / MODEL_NAME / "1")
    f = write(tmp_path / "exp.toml", AB)
    s = settings(repo2, redis_url, f, log_sample_rate=1.0)
    async with running_app(s) as c:
        await rank(c, "u1", headers={"X-Request-ID": "plain-1"})
        await rank(c, "u1", headers={"X-Request-ID": "forced-1", "X-Admin-Key": ADMIN,
                                     "X-Ranker-Arm": "v2-vs-v1/treatment"})
        client = redis_sync.Redis.from_url(redis_url)
        stream = served_stream(s.redis_prefix)
        await wait_for(lambda: client.xlen(stream) >= 2)
        recs = {r.request_id: r for r in (decode_served(fields) for _, fields in
                                          client.xrange(stream))}
        client.close()
    assert (recs["plain-1"].experiment, recs["plain-1"].arm, recs["plain-1"].forced) == (
        "v2-vs-v1", arm_of("u1"), False)
    assert (recs["forced-1"].arm, recs["forced-1"].forced) == ("treatment", True)


async def test_reload_without_restart_keeps_the_old_file_when_refused(repo2, redis_url,
                                                                      tmp_path):
    load_features(redis_url, repo2 / MODEL_NAME / "1")
    f = write(tmp_path / "exp.toml", AB)
    async with running_app(settings(repo2, redis_url, f)) as c:
        assert (await rank(c, "u1"))["experiment"] == "v2-vs-v1"
        before = metric("ranker_experiments_reloads_total", {"result": "failure"})
        write(f, AB.replace("model_version = 2", "model_version = 9"))  # unknown version
        await wait_for(lambda: metric("ranker_experiments_reloads_total",
                                      {"result": "failure"}) > before)
        assert (await rank(c, "u1"))["experiment"] == "v2-vs-v1"  # the old file stays
        write(f, AB.replace("v2-vs-v1", "renamed"))
        async def renamed() -> bool:
            return (await rank(c, "u1"))["experiment"] == "renamed"
        for _ in range(200):
            if await renamed():
                break
            await asyncio.sleep(0.02)
        assert await renamed()
        write(f, "")  # no experiment: the default response again
        for _ in range(200):
            if "experiment" not in await rank(c, "u1"):
                break
            await asyncio.sleep(0.02)
        assert "experiment" not in await rank(c, "u1")


async def test_a_refused_file_at_startup_refuses_to_start(repo2, redis_url, tmp_path):
    f = write(tmp_path / "exp.toml", AB.replace("share = 0.5\nmodel_version = 2",
                                                "share = 0.4\nmodel_version = 2"))
    from asgi_lifespan import LifespanManager

    with pytest.raises(ExperimentsError, match="shares sum to"):
        async with LifespanManager(create_app(settings(repo2, redis_url, f)),
                                   startup_timeout=60):
            pass


CANARY = canary_toml("canary", "s1", steps=[0.5, 1.0], max_error_ratio=0.05)


async def test_a_failing_canary_is_rolled_back(model_repo, redis_url, tmp_path):
    from tests.service.variants import export_brittle_version

    export_brittle_version(model_repo, 2, max_batch=4)  # passes a warm-up at 4, fails above
    load_features(redis_url, model_repo / MODEL_NAME / "1")
    f = write(tmp_path / "exp.toml", CANARY)
    s = settings(model_repo, redis_url, f, warmup_batch_sizes=[1, 4], canary_min_requests=5)
    users = [f"user{i}" for i in range(200)]
    async with running_app(s) as c:
        failed_canary = failed_other = 0
        for u in users:
            r = await c.post("/rank", json={"user_id": u, "candidates": CANDS})
            canary_user = unit_hash("s1", u) < 0.5
            if r.status_code != 200:
                assert canary_user, r.text
                failed_canary += 1
            elif canary_user:  # served after the rollback
                assert r.json()["arm"] == "stable"
        assert failed_other == 0
        assert 5 <= failed_canary < 20
        assert metric("ranker_canary_rollbacks_total", {"experiment": "canary", "arm": "canary",
                                                        "reason": "errors"}) == 1
        info = (await c.get("/model")).json()["experiments"]["experiments"][0]
        assert info["canary"]["rolled_back"] is True
        assert {a["name"]: a["share"] for a in info["arms"]} == {"canary": 0.0, "stable": 1.0}
    rb = json.loads((tmp_path / "exp.toml.rollback.json").read_text())
    assert rb["canary"]["arm"] == "canary"
    # another worker (a new process reading the same files) starts with the canary at 0
    async with running_app(s) as c:
        for u in users[:30]:
            assert (await rank(c, u))["arm"] == "stable"


async def test_shadow_scores_off_the_request_path(repo2, redis_url, tmp_path):
    import redis as redis_sync

    load_features(redis_url, repo2 / MODEL_NAME / "1")
    f = write(tmp_path / "exp.toml", "[shadow]\nmodel_version = 2\n")
    s = settings(repo2, redis_url, f, log_sample_rate=1.0)
    before = metric("ranker_shadow_runs_total", {"result": "scored"})
    taus = metric("ranker_shadow_kendall_tau_count")
    async with running_app(s) as c:
        for i in range(5):
            body = await rank(c, "u1", headers={"X-Request-ID": f"sh-{i}"})
            assert "experiment" not in body and body["model"]["version"] == 1
        await wait_for(lambda: metric("ranker_shadow_runs_total", {"result": "scored"})
                       >= before + 5)
        client = redis_sync.Redis.from_url(redis_url)
        stream = served_stream(s.redis_prefix)
        await wait_for(lambda: client.xlen(stream) >= 5)
        recs = [decode_served(fields) for _, fields in client.xrange(stream)]
        client.close()
    assert metric("ranker_shadow_kendall_tau_count") >= taus + 5
    assert metric("ranker_shadow_top_overlap_count") >= 5
    for r in recs:
        assert r.shadow is not None and r.shadow.shape == (len(CANDS),)
