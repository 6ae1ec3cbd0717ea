"""A model lifecycle an operator can trust (issue 14, items 8-11), through the real app with real
tiny ONNX models: a warm-up failure is a refusal like any other, start-up falls back to the
newest version that passes, a pin sticks until it is removed, admin is safe by default and the
public routes disclose no filesystem path."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.service.helpers import metric, running_app
from tests.support import settings_for
from tests.tiny import MODEL_NAME, flip_byte, install_version

pytestmark = pytest.mark.asyncio

BODY = {"user_id": "u1", "candidates": [f"i{i}" for i in range(20)]}
WATCH_S = 0.1


def failures() -> float:
    return metric("ranker_model_reloads_total", {"result": "failure"})


def install_brittle(brittle_models: Path, repo: Path, version: int) -> Path:
    """The brittle model (passes every check, fails warm-up at 8 candidates) as `version`."""
    return install_version(brittle_models, repo, version, source=1)


async def wait_for(cond, timeout_s: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout_s
    while not await cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def serving(client: httpx.AsyncClient) -> int:
    r = await client.post("/rank", json=BODY)
    assert r.status_code == 200, r.text
    return int(r.json()["model"]["version"])


async def no_path_in(client: httpx.AsyncClient, repo: Path, *paths: str) -> None:
    """None of the public answers names the repository's path (or any absolute path)."""
    for p in paths:
        text = (await client.get(p)).text
        assert str(repo) not in text and "/tmp/" not in text, text


# -- 8: a warm-up failure is a refused version ---------------------------------------------------


async def test_warmup_failure_is_refused_by_the_admin_reload(model_repo, brittle_models,
                                                             redis_url):
    # warm-up at 8 candidates: the brittle graph fails there, after passing the golden sample
    async with running_app(settings_for(model_repo, redis_url, warmup_batch_sizes=[1, 8])) as c:
        install_brittle(brittle_models, model_repo, 2)
        before = failures()
        r = await c.post("/admin/reload")  # today: the onnxruntime error escapes, a 500
        assert r.status_code == 409, r.text
        assert r.json()["result"] == "failure" and r.json()["check"] == "warmup"
        assert "warm-up at 8 candidates" in r.json()["detail"]
        assert r.json()["serving_version"] == 1
        assert failures() == before + 1
        assert await serving(c) == 1
        ready = (await c.get("/readyz")).json()
        assert ready["status"] == "ready" and ready["refused"] == [{"version": 2,
                                                                    "check": "warmup"}]


async def test_warmup_failure_is_remembered_by_the_watcher(model_repo, brittle_models,
                                                           redis_url):
    settings = settings_for(model_repo, redis_url, warmup_batch_sizes=[1, 8],
                            model_watch_interval_s=WATCH_S)
    async with running_app(settings) as c:
        before = failures()
        install_brittle(brittle_models, model_repo, 2)

        async def refused_once() -> bool:
            return failures() > before

        await wait_for(refused_once, what="the watcher to refuse version 2")
        await asyncio.sleep(15 * WATCH_S)  # 15 more polls: none may retry the same files
        assert failures() == before + 1  # today: retried (and logged) at every poll
        assert await serving(c) == 1


async def test_warmup_failure_at_startup_is_unready_not_a_crash(tmp_path, brittle_models,
                                                                redis_url):
    repo = tmp_path / "models"
    (repo / MODEL_NAME).mkdir(parents=True)
    install_brittle(brittle_models, repo, 1)  # the only version
    settings = settings_for(repo, redis_url, warmup_batch_sizes=[1, 8],
                            model_watch_interval_s=WATCH_S)
    before = failures()
    async with running_app(settings) as c:  # today: the lifespan raises, the app never starts
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json()["reason"] == "no model loaded", r.text
        assert r.json()["last_reload"] == {"result": "failure", "version": 1, "check": "warmup"}
        assert (await c.get("/healthz")).status_code == 200
        rank = await c.post("/rank", json=BODY)
        assert rank.status_code == 503 and rank.json()["error"] == "model_unavailable"
        await asyncio.sleep(10 * WATCH_S)
        assert failures() == before + 1  # start-up tried it once; the watcher did not again
        await no_path_in(c, repo, "/readyz")


# -- 9: start-up falls back to the newest version that passes ------------------------------------


async def test_startup_falls_back_to_the_newest_version_that_passes(
        model_repo, pristine_models, brittle_models, redis_url):
    bad = install_version(pristine_models, model_repo, 2)
    flip_byte(bad / "model.onnx")  # v2: sha256 mismatch
    install_brittle(brittle_models, model_repo, 3)  # v3 (newest): fails warm-up
    settings = settings_for(model_repo, redis_url, warmup_batch_sizes=[1, 8],
                            model_watch_interval_s=WATCH_S)
    async with running_app(settings) as c:  # today: the lifespan crashes on v3's warm-up
        assert await serving(c) == 1
        ready = await c.get("/readyz")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["model"]["version"] == 1 and body["fallback"] is True
        assert body["refused"] == [{"version": 2, "check": "files"},
                                   {"version": 3, "check": "warmup"}]
        model = (await c.get("/model")).json()
        assert model["version"] == 1 and model["serving"]["fallback"] is True
        assert model["serving"]["refused"] == body["refused"]
        assert metric("ranker_model_fallback") == 1
        await no_path_in(c, model_repo, "/readyz", "/model")

        install_version(pristine_models, model_repo, 4)  # a good newer version: no fallback

        async def on_v4() -> bool:
            return await serving(c) == 4

        await wait_for(on_v4, what="the watcher to load version 4")
        assert (await c.get("/readyz")).json()["fallback"] is False
        assert metric("ranker_model_fallback") == 0


# -- 10: a rollback sticks -----------------------------------------------------------------------


async def test_admin_pin_sticks_through_the_watcher_until_unpinned(model_repo, pristine_models,
                                                                   redis_url):
    install_version(pristine_models, model_repo, 2)
    settings = settings_for(model_repo, redis_url, model_watch_interval_s=WATCH_S)
    async with running_app(settings) as c:
        assert await serving(c) == 2
        r = await c.post("/admin/pin", params={"version": 1})  # today: 404, no such route
        assert r.status_code == 200, r.text
        assert r.json()["serving_version"] == 1
        assert (model_repo / MODEL_NAME / "PINNED").read_text().strip() == "1"
        await asyncio.sleep(10 * WATCH_S)  # ten polls of a watcher that sees version 2
        assert await serving(c) == 1
        assert (await c.get("/readyz")).json()["pinned"] == {"version": 1, "source": "file"}
        # a plain reload respects the pin; another explicit version is refused
        r = await c.post("/admin/reload")
        assert r.status_code == 200 and r.json()["result"] == "unchanged", r.text
        r = await c.post("/admin/reload", params={"version": 2})
        assert r.status_code == 409 and r.json()["result"] == "pinned", r.text
        install_version(pristine_models, model_repo, 3)  # even a newer version does not move it
        await asyncio.sleep(5 * WATCH_S)
        assert await serving(c) == 1

        r = await c.post("/admin/unpin")
        assert r.status_code == 200, r.text
        assert r.json()["serving_version"] == 3
        assert not (model_repo / MODEL_NAME / "PINNED").exists()
        assert (await c.get("/readyz")).json()["pinned"] is None


async def test_pinning_a_refused_version_is_409_and_writes_no_pin(model_repo, pristine_models,
                                                                  redis_url):
    bad = install_version(pristine_models, model_repo, 2, source=1)
    flip_byte(bad / "model.onnx")
    async with running_app(settings_for(model_repo, redis_url)) as c:
        assert await serving(c) == 1  # start-up fell back past the corrupt v2
        for version in (2, 7):  # corrupt, absent
            r = await c.post("/admin/pin", params={"version": version})
            assert r.status_code == 409 and r.json()["result"] == "failure", r.text
        assert not (model_repo / MODEL_NAME / "PINNED").exists()
        assert await serving(c) == 1


async def test_model_version_setting_pins_at_startup_and_through_the_watcher(
        model_repo, pristine_models, redis_url):
    install_version(pristine_models, model_repo, 2)
    settings = settings_for(model_repo, redis_url, model_version=1,
                            model_watch_interval_s=WATCH_S)
    async with running_app(settings) as c:  # today: the setting does not exist, v2 serves
        assert await serving(c) == 1
        await asyncio.sleep(10 * WATCH_S)
        assert await serving(c) == 1
        body = (await c.get("/readyz")).json()
        assert body["pinned"] == {"version": 1, "source": "setting"} and body["fallback"] is False


async def test_a_pin_file_reaches_a_worker_whose_watcher_is_off(model_repo, pristine_models,
                                                                redis_url):
    """What another worker's POST /admin/pin does to this one: it writes the pin file."""
    install_version(pristine_models, model_repo, 2)
    settings = settings_for(model_repo, redis_url, model_pin_poll_s=WATCH_S)  # no watcher
    async with running_app(settings) as c:
        assert await serving(c) == 2
        (model_repo / MODEL_NAME / "PINNED").write_text("1\n")

        async def on(version: int) -> bool:
            return await serving(c) == version

        await wait_for(lambda: on(1), what="the pin file to reach this worker")
        (model_repo / MODEL_NAME / "PINNED").unlink()  # unpinned elsewhere: back to the newest
        await wait_for(lambda: on(2), what="the unpin to reach this worker")


async def test_an_unreadable_pin_file_moves_nothing(model_repo, pristine_models, redis_url):
    settings = settings_for(model_repo, redis_url, model_watch_interval_s=WATCH_S)
    async with running_app(settings) as c:
        (model_repo / MODEL_NAME / "PINNED").write_text("two\n")
        install_version(pristine_models, model_repo, 2)
        await asyncio.sleep(10 * WATCH_S)
        assert await serving(c) == 1  # nobody can tell what to serve: nothing moves
        pinned = (await c.get("/readyz")).json()["pinned"]
        assert pinned == {"version": None, "source": "file", "error": "unreadable"}


# -- 11: admin is safe by default, public routes disclose no path --------------------------------


async def test_api_keys_without_an_admin_key_refuse_admin(model_repo, redis_url):
    settings = settings_for(model_repo, redis_url, api_keys=["user-key"])
    async with running_app(settings) as c:
        for method, path in (("POST", "/admin/reload"), ("POST", "/admin/pin?version=1"),
                             ("POST", "/admin/unpin")):
            for headers in ({}, {"X-API-Key": "user-key"}, {"X-Admin-Key": "user-key"}):
                r = await c.request(method, path, headers=headers)
                # today: 200, anyone who can reach the API can reload or roll back the model
                assert r.status_code == 403, (path, headers, r.text)
                assert r.json()["error"] == "admin_disabled"
        r = await c.post("/rank", json=BODY, headers={"X-API-Key": "user-key"})
        assert r.status_code == 200, r.text
        assert not (model_repo / MODEL_NAME / "PINNED").exists()
    with_admin = settings_for(model_repo, redis_url, api_keys=["user-key"],
                              admin_api_key="admin-key")
    async with running_app(with_admin) as c:
        r = await c.post("/admin/reload", headers={"X-Admin-Key": "admin-key"})
        assert r.status_code == 200, r.text


async def test_public_routes_disclose_no_filesystem_path(model_repo, tmp_path, redis_url):
    async with running_app(settings_for(model_repo, redis_url)) as c:
        await no_path_in(c, model_repo, "/readyz", "/model")  # today: /model serving.path
    empty = tmp_path / "empty"
    empty.mkdir()
    async with running_app(settings_for(empty, redis_url)) as c:
        r = await c.get("/readyz")
        assert r.status_code == 503
        await no_path_in(c, empty, "/readyz")  # today: last_reload.detail names the directory


async def test_copied_repository_keeps_its_pin(model_repo, pristine_models, redis_url, tmp_path):
    """The pin lives with the models: a restart (here: a new app on the same repository) keeps
    serving the pinned version."""
    install_version(pristine_models, model_repo, 2)
    settings = settings_for(model_repo, redis_url)
    async with running_app(settings) as c:
        assert (await c.post("/admin/pin", params={"version": 1})).status_code == 200
    async with running_app(settings) as c:
        assert await serving(c) == 1
    copy = tmp_path / "copy"
    shutil.copytree(model_repo, copy)
    async with running_app(settings_for(copy, redis_url)) as c:
        assert await serving(c) == 1
