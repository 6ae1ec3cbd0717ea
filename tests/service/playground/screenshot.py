"""Take the README's playground screenshot from a running service, the way a user would.

    python -m tests.service.playground.screenshot --url http://127.0.0.1:8000 \
        --out docs/img/playground.png

It picks a preset, turns `explain` on, nudges one slider (so the list shows how items moved),
and saves a full-page PNG. Needs Debian's /usr/bin/chromium and the playwright package.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from playwright.sync_api import sync_playwright

from tests.service.playground.live import CHROMIUM, CHROMIUM_ARGS


def wait_until(page: Any, js: str, timeout_s: float = 20.0) -> None:
    """Poll a predicate with evaluate() (the page's CSP forbids wait_for_function's eval)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(js):
        if time.monotonic() > deadline:
            raise TimeoutError(js)
        page.wait_for_timeout(50)


def rendered_count(page: Any) -> int:
    return int(page.get_attribute("#ranked", "data-seq") or 0)


def wait_rendered_after(page: Any, n: int) -> None:
    """Until the list has been re-rendered since render number n."""
    wait_until(page, f"() => Number(document.querySelector('#ranked').dataset.seq) > {n}")


def shoot(url: str, out: Path, items: int, preset: str, nudge: str, steps: int) -> None:
    """Drive the page and save the screenshot."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{url}/playground")
            wait_until(page, "() => document.querySelectorAll('#ranked li').length > 0")
            page.fill("#n-items", str(items))
            n = rendered_count(page)
            page.click("#sample-btn")
            wait_rendered_after(page, n)
            if preset:
                n = rendered_count(page)
                page.select_option("#preset", preset)
                wait_rendered_after(page, n)
            page.check("#explain")
            wait_until(page, "() => document.querySelectorAll('#heatmap .hm-cell').length > 0")
            if nudge:
                n = rendered_count(page)
                page.focus(f"#w-{nudge}")
                for _ in range(steps):
                    page.keyboard.press("ArrowRight")
                wait_rendered_after(page, n)
                page.wait_for_timeout(400)  # let the debounced last step land
            page.mouse.move(0, 0)  # no hover highlight in the picture
            page.evaluate("() => document.activeElement && document.activeElement.blur()")
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            weights = json.loads(page.get_attribute("#ranked", "data-weights") or "{}")
            print(f"saved {out} (weights {weights}, status: {page.text_content('#status')})")
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--out", type=Path, default=Path("docs/img/playground.png"))
    ap.add_argument("--items", type=int, default=15, help="candidates to sample")
    ap.add_argument("--preset", default="engagement", help="preset to pick ('' = none)")
    ap.add_argument("--nudge", default="like", help="task whose slider is moved ('' = none)")
    ap.add_argument("--steps", type=int, default=30, help="slider steps (0.1 each)")
    a = ap.parse_args(argv)
    shoot(a.url.rstrip("/"), a.out, a.items, a.preset, a.nudge, a.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
