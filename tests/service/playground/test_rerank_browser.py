"""The playground's re-rank controls in a real browser against the real service."""

from __future__ import annotations

from typing import Any

from tests.service.playground.test_browser import (  # noqa: F401  (fixtures)
    ARTIFACTS,
    Tab,
    browser,
    ranked,
    service,
    tab,
    wait_until,
)


def why(page: Any) -> list[dict[str, Any]]:
    return page.eval_on_selector_all(
        "#ranked li .why",
        "ws => ws.map(w => ({id: w.closest('li').dataset.id, rules: w.dataset.rules, "
        "from: Number(w.dataset.from)}))",
    )


def test_diversity_and_filter_toggles_show_what_moved_and_why(tab: Tab, service: str) -> None:  # noqa: F811
    page = tab.page
    page.goto(f"{service}/playground")
    wait_until(page, "() => document.querySelectorAll('#ranked li').length === 20")
    attrs = page.eval_on_selector_all("#diversity-attr option", "os => os.map(o => o.value)")
    assert "category" in attrs and "item_id" not in attrs
    plain = [r["id"] for r in ranked(page)]
    assert why(page) == [] and page.text_content("#rerank-summary") == ""

    page.select_option("#diversity-attr", "category")
    page.check("#diversity-on")
    wait_until(page, "() => document.querySelector('#rerank-summary').textContent !== ''")
    summary = page.text_content("#rerank-summary")
    moved = why(page)
    if "diversity" in page.get_attribute("#rerank-summary", "data-applied"):
        assert moved and all("diversity" in m["rules"] for m in moved)
        for m in moved:  # "was #n" is the item's place in the plain score order
            assert plain[m["from"]] == m["id"]
    else:
        assert "no rule changed the list" in summary and moved == []

    page.check("#filters-on")
    page.fill("#filter-ids", plain[0])
    wait_until(page, "id => !document.querySelector(`#ranked li[data-id='${id}']`)", plain[0])
    wait_until(page, "() => document.querySelector('#rerank-summary').textContent"
                     ".includes('1 filtered out')")
    assert len(ranked(page)) == 19

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-rerank.png"), full_page=True)
    assert tab.errors == [], tab.errors
    assert tab.off_host == [], tab.off_host
