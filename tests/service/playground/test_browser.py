"""The playground in a real browser (Debian's Chromium, headless) against the real service.

A real uvicorn process serves a real exported model with features in a real Redis; the test
moves the sliders with the keyboard as a user would and reads the ranking back from the DOM.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from launch.local_redis import RedisServer
from ranker.manifest import load_manifest, load_schema
from service.settings import Settings
from tests.conftest import emptied_url
from tests.service.playground.live import CHROMIUM, CHROMIUM_ARGS, load_features, run_service
from tests.support import free_port

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
TIMEOUT_MS = 15_000

if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} is absent (Debian package `chromium`: apt-get install -y chromium)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is absent (pip install playwright)"
)


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path, redis_server: RedisServer) -> Iterator[str]:
    """The real service with the playground on, features for every vocabulary id loaded.

    Module-scoped (one uvicorn start for the module), so it empties the session's Redis itself
    as the function-scoped `redis_url` fixture would.
    """
    emptied_url(redis_server)
    load_features(redis_server.url, load_schema(tiny_model_dir, load_manifest(tiny_model_dir)))
    with run_service(tiny_model_dir, redis_server.url) as base:
        yield base


@dataclass
class Tab:
    """A browser page plus what it logged: console errors and requests that left loopback."""

    page: Any
    errors: list[str] = field(default_factory=list)
    off_host: list[str] = field(default_factory=list)

    def on_request(self, url: str) -> None:
        if url.startswith("http") and urlsplit(url).hostname != "127.0.0.1":
            self.off_host.append(url)

    def on_console(self, kind: str, text: str) -> None:
        if kind == "error":
            self.errors.append(text)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium (Debian's binary) for the module; each test gets its own context."""
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def tab(browser: Any) -> Iterator[Tab]:
    """A fresh page (own cookies and storage) that records errors and requests."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        t = Tab(page)
        page.on("console", lambda m: t.on_console(m.type, m.text))
        page.on("pageerror", lambda e: t.errors.append(str(e)))
        page.on("request", lambda r: t.on_request(r.url))
        yield t
    finally:
        context.close()


def ranked(page: Any) -> list[dict[str, Any]]:
    """The list as the page shows it: id, final score, per-task scores and the move badge."""
    return page.eval_on_selector_all(
        "#ranked li",
        """lis => lis.map(li => ({
            id: li.dataset.id,
            score: Number(li.dataset.score),
            move: li.querySelector('.move').dataset.delta ?? null,
            scores: Object.fromEntries([...li.querySelectorAll('.bar')].map(
                b => [b.dataset.task, Number(b.dataset.score)])),
        }))""",
    )


def wait_until(page: Any, js: str, arg: Any = None, timeout_s: float = TIMEOUT_MS / 1000) -> None:
    """Poll a JS predicate (bounded in time). Playwright's wait_for_function evaluates strings
    inside the page, which the page's own CSP (no eval) rightly forbids; evaluate() does not."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(js, arg):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for: {js}")
        page.wait_for_timeout(50)


def wait_for_weights(page: Any, weights: dict[str, float]) -> None:
    """Until the rendered list is the one /rank returned for exactly these weights."""
    wait_until(
        page,
        """want => {
            const got = JSON.parse(document.querySelector('#ranked').dataset.weights || '{}');
            return Object.keys(want).every(t => Math.abs(got[t] - want[t]) < 1e-9);
        }""",
        weights,
    )


def set_slider(page: Any, task: str, to: str) -> None:
    """Move a task's slider to its end ("End") or start ("Home") with the keyboard."""
    page.focus(f"#w-{task}")
    page.keyboard.press(to)


def test_share_slider_at_max_ranks_by_share(tab: Tab, service: str) -> None:
    page = tab.page
    page.goto(f"{service}/playground")
    wait_until(page, "() => document.querySelectorAll('#ranked li').length === 20")
    tasks = page.eval_on_selector_all(
        "#sliders input[type=range]", "xs => xs.map(x => x.dataset.task)"
    )
    manifest_tasks = json.loads(page.evaluate("fetch('/model').then(r => r.text())"))["tasks"]
    assert tasks == manifest_tasks  # one slider per task of the serving model, in its order
    assert set(ranked(page)[0]["scores"]) == set(manifest_tasks)

    share_max = float(page.get_attribute("#w-share", "max"))
    for task in tasks:
        set_slider(page, task, "End" if task == "share" else "Home")
    want = {t: (share_max if t == "share" else 0.0) for t in tasks}
    wait_for_weights(page, want)
    rows = ranked(page)
    assert len(rows) == 20
    share = [r["scores"]["share"] for r in rows]
    assert share == sorted(share, reverse=True), "list is not ordered by share score"
    assert len(set(share)) > 1  # distinct scores: the order above says something
    for r in rows:  # the final score is the weighted sum the page asked for
        assert r["score"] == pytest.approx(share_max * r["scores"]["share"], rel=1e-5)

    # One more change: each badge says how far its item moved since the previous weights.
    before = {r["id"]: i for i, r in enumerate(rows)}
    set_slider(page, "click", "End")
    wait_for_weights(page, {**want, "click": float(page.get_attribute("#w-click", "max"))})
    after = ranked(page)
    assert {r["id"] for r in after} == set(before)
    for i, r in enumerate(after):
        assert int(r["move"]) == before[r["id"]] - i, r
    finals = [r["score"] for r in after]
    assert finals == sorted(finals, reverse=True)

    # explain: a task x expert heatmap of gate weights; each task's row is a distribution.
    page.check("#explain")
    n_experts = int(json.loads(page.evaluate("fetch('/model').then(r => r.text())"))["n_experts"])
    wait_until(
        page,
        f"() => document.querySelectorAll('#heatmap .hm-cell').length === {len(tasks) * n_experts}",
    )
    for task in tasks:
        cells = page.eval_on_selector_all(
            f"#heatmap .hm-cell[data-task='{task}']", "cs => cs.map(c => Number(c.textContent))"
        )
        assert len(cells) == n_experts
        assert sum(cells) == pytest.approx(1.0, abs=0.03)  # shown to 2 decimals
    assert "mean gate weights over 20 items" in page.text_content("#heatmap-title")
    first = after[0]["id"]
    page.click(f"#ranked li[data-id='{first}']")  # one item's own gates
    assert f"gate weights of item {first}" in page.text_content("#heatmap-title")
    assert page.get_attribute(f"#ranked li[data-id='{first}']", "class") == "item selected"

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    assert tab.errors == [], tab.errors  # no script error, no CSP violation, no 404
    assert tab.off_host == [], tab.off_host  # nothing fetched from outside the service


def test_typed_user_and_pasted_ids_are_ranked(tab: Tab, service: str) -> None:
    page = tab.page
    page.goto(f"{service}/playground")
    page.wait_for_selector("#ranked li")
    page.fill("#user-input", "someone-new")
    page.fill("#candidates", "i3, i1\ni2 i1")  # a duplicate is dropped before sending
    page.click("#apply-candidates")
    wait_until(page, "() => document.querySelector('#status').textContent.includes('unknown user')")
    assert sorted(r["id"] for r in ranked(page)) == ["i1", "i2", "i3"]
    assert "1 duplicate dropped" in page.text_content("#n-candidates")

    page.fill("#candidates", "i1 " + "x" * 300)  # an id over the service's length limit
    page.click("#apply-candidates")
    wait_until(page, "() => document.body.dataset.state === 'error'")
    assert "422" in page.text_content("#status") and "candidates" in page.text_content("#status")


API_KEY = "playground-test-key"
FETCH_RANK = """async url => {
    try {
        const r = await fetch(url + '/rank', {
            method: 'POST',
            headers: {'Content-Type': 'application/json', 'X-Request-ID': 'from-a-browser',
                      'X-API-Key': 'API_KEY'},
            body: JSON.stringify({user_id: 'u1', candidates: ['i1', 'i2', 'i3']}),
        });
        const body = await r.json();
        return {status: r.status, rid: r.headers.get('x-request-id'), n: body.items.length};
    } catch (e) {
        return {error: String(e)};
    }
}""".replace("API_KEY", API_KEY)


@pytest.fixture(scope="module")
def cors_service(service: str, tiny_model_dir: Path, redis_server: RedisServer) -> Iterator[str]:
    """A second instance (same model and features) that allows the origin http://localhost:P
    and requires an API key on /rank."""
    port = free_port()
    origins = json.dumps([f"http://localhost:{port}"])
    with run_service(
        tiny_model_dir, redis_server.url, port=port,
        RANKER_CORS_ORIGINS=origins, RANKER_API_KEYS=json.dumps([API_KEY]),
    ) as base:  # fmt: skip
        yield base


def test_a_page_on_an_allowed_origin_calls_rank_and_others_are_blocked(
    tab: Tab, service: str, cors_service: str
) -> None:
    """Real CORS in a real browser: http://localhost:P and http://127.0.0.1:P are two origins."""
    page = tab.page
    port = urlsplit(cors_service).port
    page.goto(f"http://localhost:{port}/healthz")  # a page whose origin is on the allow-list
    got = page.evaluate(FETCH_RANK, cors_service)  # cross-origin: preflighted (JSON, X-Request-ID)
    assert got == {"status": 200, "rid": "from-a-browser", "n": 3}, got

    # The same call from a page on another loopback origin (the first service's), not listed:
    # the browser must refuse it. Both pages are loopback, so only CORS differs between them.
    page.goto(f"{service}/healthz")
    blocked = page.evaluate(FETCH_RANK, cors_service)
    assert "error" in blocked and "Failed to fetch" in blocked["error"], blocked
    assert any("blocked by CORS policy" in e for e in tab.errors), tab.errors


@pytest.mark.skipif(
    "api_keys" not in Settings.model_fields, reason="this build has no API keys (RANKER_API_KEYS)"
)
def test_playground_sends_the_api_key_where_auth_is_on(tab: Tab, cors_service: str) -> None:
    page = tab.page
    page.goto(f"{cors_service}/playground")
    wait_until(page, "() => document.body.dataset.state === 'error'")
    assert "401" in page.text_content("#status") and "X-API-Key" in page.text_content("#status")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    wait_until(page, "() => document.querySelectorAll('#ranked li').length > 0")
    assert page.evaluate("() => document.body.dataset.state") == "ready"


def test_explain_on_a_model_without_gates_says_so(
    tab: Tab, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.tiny import export_tiny_model

    vdir = export_tiny_model(tmp_path_factory.mktemp("sb"), name="sb",
                             model_type="shared_bottom", bottom_hidden=[8])
    # same tiny schema as the other model: features in Redis (or defaults) serve it as well
    with run_service(vdir, redis_server.url) as base:
        page = tab.page
        page.goto(f"{base}/playground")
        wait_until(page, "() => document.querySelectorAll('#ranked li').length === 20")
        page.check("#explain")
        wait_until(page, "() => !document.querySelector('#heatmap-box').hidden")
        assert "has no gates" in page.text_content("#heatmap-title")
        assert page.eval_on_selector_all("#heatmap .hm-cell", "cs => cs.length") == 0
    assert tab.errors == [], tab.errors
