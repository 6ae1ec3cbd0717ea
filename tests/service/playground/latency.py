"""How long a slider move takes to re-rank in a real browser, by candidate count.

    python -m tests.service.playground.latency --url http://127.0.0.1:8000 --sizes 20 100 1000

For each size it samples that many items, then moves the `share` slider one step at a time
(waiting for each re-rank) and reads the page's own timings: the `/rank` fetch as the browser
saw it (request to parsed JSON) and the time to rebuild the list. Prints medians and p95.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from playwright.sync_api import sync_playwright

from tests.service.playground.live import CHROMIUM, CHROMIUM_ARGS
from tests.service.playground.screenshot import rendered_count, wait_rendered_after


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def measure(page: Any, size: int, repeats: int) -> tuple[list[float], list[float]]:
    """Fetch and render milliseconds of `repeats` single-step slider moves with `size` items."""
    page.fill("#n-items", str(size))
    n = rendered_count(page)
    page.click("#sample-btn")
    wait_rendered_after(page, n)
    page.focus("#w-share")
    page.keyboard.press("Home")
    fetch, render = [], []
    for _ in range(repeats):
        n = rendered_count(page)
        page.keyboard.press("ArrowRight")
        wait_rendered_after(page, n)
        fetch.append(float(page.get_attribute("#ranked", "data-fetch-ms") or "nan"))
        render.append(float(page.get_attribute("#ranked", "data-render-ms") or "nan"))
    return fetch, render


# Render synthetic responses straight into the page (no server round trip): rebuild + layout.
SYNTHETIC_RENDER = """([n, repeats]) => {
  const tasks = ['click', 'like', 'share'];
  const items = Array.from({length: n}, (_, i) => ({id: 'i' + i, score: Math.random(),
    scores: {click: Math.random(), like: Math.random() / 10, share: Math.random() / 100}}));
  const resp = {tasks, items, weights: {click: 1, like: 1, share: 1},
                model: {name: 'm', version: 1}, scoring: 'weighted_sum'};
  const times = [];
  for (let r = 0; r < repeats; r++) {
    const t = performance.now();
    render(resp, 'synthetic');
    void document.body.offsetHeight;
    times.push(performance.now() - t);
  }
  return times;
}"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--sizes", type=int, nargs="+", default=[20, 100, 1000])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--synthetic", action="store_true",
                    help="only time the page's render + layout of synthetic lists")
    ap.add_argument("--css", type=Path, default=None,
                    help="swap in this stylesheet first (e.g. an older one from git show)")
    a = ap.parse_args(argv)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            # bypass_csp only to inject a stylesheet under test; the page itself is unchanged
            context = browser.new_context(viewport={"width": 1280, "height": 900},
                                          bypass_csp=a.css is not None)
            page = context.new_page()
            page.goto(f"{a.url.rstrip('/')}/playground")
            page.wait_for_selector("#ranked li")
            if a.css is not None:
                page.evaluate("() => document.querySelector('link[rel=stylesheet]').remove()")
                page.add_style_tag(content=a.css.read_text())
            if a.synthetic:
                print("| rows | render+layout p50 ms |\n|---:|---:|")
                for size in a.sizes:
                    times = page.evaluate(SYNTHETIC_RENDER, [size, a.repeats])
                    print(f"| {size} | {statistics.median(times):.1f} |")
                return 0
            print("| candidates | fetch p50 ms | fetch p95 ms | render p50 ms | render p95 ms |")
            print("|---:|---:|---:|---:|---:|")
            for size in a.sizes:
                f, r = measure(page, size, min(a.repeats, 99))  # the slider has 100 steps
                print(f"| {size} | {statistics.median(f):.1f} | {pct(f, 0.95):.1f} | "
                      f"{statistics.median(r):.1f} | {pct(r, 0.95):.1f} |")
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
