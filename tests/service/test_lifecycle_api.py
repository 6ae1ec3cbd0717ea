"""Hot swap through the running app: admin reload, watcher, refused versions, no failed requests."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.service.helpers import metric, running_app
from tests.support import settings_for
from tests.tiny import flip_byte, install_version

pytestmark = pytest.mark.asyncio

BODY = {"user_id": "u1", "candidates": [f"i{i}" for i in range(20)]}


def info(version: int) -> float:
    return metric("ranker_model_info", {"name": "mmoe", "version": str(version)})


async def test_admin_reload_swaps_and_refuses_bad_versions(model_repo, pristine_models, redis_url):
    async with running_app(settings_for(model_repo, redis_url)) as client:
        assert (await client.get("/model")).json()["version"] == 1
        assert info(1) == 1
        r = await client.post("/admin/reload")
        assert r.status_code == 200 and r.json()["result"] == "unchanged"

        install_version(pristine_models, model_repo, 2)
        success = metric("ranker_model_reloads_total", {"result": "success"})
        r = await client.post("/admin/reload")
        assert r.status_code == 200 and r.json()["result"] == "success", r.text
        assert r.json()["serving_version"] == 2
        assert (await client.post("/rank", json=BODY)).json()["model"]["version"] == 2
        assert info(2) == 1 and info(1) == 0
        assert metric("ranker_model_reloads_total", {"result": "success"}) == success + 1

        bad = install_version(pristine_models, model_repo, 3, source=1)
        flip_byte(bad / "model.onnx")
        failure = metric("ranker_model_reloads_total", {"result": "failure"})
        r = await client.post("/admin/reload")
        assert r.status_code == 409 and r.json()["result"] == "failure"
        assert "sha256" in r.json()["detail"] and r.json()["serving_version"] == 2
        assert metric("ranker_model_reloads_total", {"result": "failure"}) == failure + 1
        r = await client.post("/rank", json=BODY)
        assert r.status_code == 200 and r.json()["model"]["version"] == 2
        assert (await client.get("/readyz")).status_code == 200

        wrong = install_version(pristine_models, model_repo, 4, source=1)
        manifest = json.loads((wrong / "manifest.json").read_text())
        manifest["features"]["groups"][0]["dense"][0]["mean"] = 9.0  # schema no longer matches
        (wrong / "manifest.json").write_text(json.dumps(manifest))
        r = await client.post("/admin/reload")
        assert r.status_code == 409 and "schema" in r.json()["detail"]
        assert (await client.get("/model")).json()["version"] == 2

        r = await client.post("/admin/reload", params={"version": 1})  # explicit rollback
        assert r.status_code == 200 and r.json()["serving_version"] == 1


async def test_admin_key_required_when_configured(model_repo, redis_url):
    settings = settings_for(model_repo, redis_url, admin_api_key="s3cret")
    async with running_app(settings) as client:
        assert (await client.post("/admin/reload")).status_code == 401
        r = await client.post("/admin/reload", headers={"X-Admin-Key": "wrong"})
        assert r.status_code == 401
        r = await client.post("/admin/reload", headers={"X-Admin-Key": "s3cret"})
        assert r.status_code == 200
        r = await client.post("/admin/reload", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200


async def test_watcher_swaps_while_requests_keep_succeeding(model_repo, pristine_models, redis_url):
    settings = settings_for(model_repo, redis_url, model_watch_interval_s=0.1)
    async with running_app(settings) as client:
        versions: list[int] = []

        async def traffic(stop: asyncio.Event) -> None:
            for _ in range(400):  # bounded
                if stop.is_set():
                    return
                r = await client.post("/rank", json=BODY)
                assert r.status_code == 200, r.text
                versions.append(r.json()["model"]["version"])

        stop = asyncio.Event()
        tasks = [asyncio.create_task(traffic(stop)) for _ in range(3)]
        await asyncio.sleep(0.2)
        install_version(pristine_models, model_repo, 2)
        end = time.monotonic() + 10
        while (await client.get("/model")).json()["version"] != 2:
            assert time.monotonic() < end, "watcher did not pick up version 2"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*tasks)
        # every request succeeded and named exactly one version; the swap happened mid-traffic
        assert versions[0] == 1 and versions[-1] == 2 and set(versions) == {1, 2}

        # a corrupt newer version is refused once and not retried on every poll
        bad = install_version(pristine_models, model_repo, 3, source=1)
        flip_byte(bad / "model.onnx")
        failure = metric("ranker_model_reloads_total", {"result": "failure"})
        end = time.monotonic() + 5
        while metric("ranker_model_reloads_total", {"result": "failure"}) == failure:
            assert time.monotonic() < end
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert metric("ranker_model_reloads_total", {"result": "failure"}) == failure + 1
        assert (await client.post("/rank", json=BODY)).json()["model"]["version"] == 2


async def test_no_model_starts_unready(tmp_path, redis_url):
    async with running_app(settings_for(tmp_path, redis_url)) as client:
        r = await client.get("/readyz")
        assert r.status_code == 503 and r.json()["reason"] == "no model loaded"
        r = await client.post("/rank", json=BODY)
        assert r.status_code == 503 and r.json()["error"] == "model_unavailable"
        assert (await client.get("/healthz")).status_code == 200
