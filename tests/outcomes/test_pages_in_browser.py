"""The outcome pages in a real browser: the system Chromium (/usr/bin/chromium, Debian package `chromium`, which
.ci/test installs) driven by playwright, on the hand-built program of test_page.py written to files. Every chart's SVG
is laid out at a visible size and has drawn paths, nothing is logged as an error, and a stay's link opens its page,
whose charts render too. Screenshots of both pages go to /tmp/outcomes-shots/ for a person to look at."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from iop_fhir.outcomes import page
from tests.outcomes.test_page import program_stays, report_of

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path("/tmp/outcomes-shots")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


@pytest.fixture
def opened(browser: Browser) -> Iterator[tuple[Page, list[str]]]:
    """A page at a desktop size, and the errors it reports (console errors, uncaught exceptions, failed loads)."""
    tab = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    tab.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.on("requestfailed", lambda request: errors.append(f"failed to load {request.url}"))
    yield tab, errors
    tab.close()


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """The program page, and each stay's page in stays/, as the report command writes them."""
    report, outcomes = report_of(program_stays())
    (tmp_path / "stays").mkdir()
    for outcome in outcomes:
        (tmp_path / "stays" / f"{outcome['enrollment_id']}.html").write_text(page.patient_page(outcome), "utf-8")
    html = page.program_page(report, outcomes, patient_href=lambda eid: f"stays/{eid}.html")
    (tmp_path / "program.html").write_text(html, encoding="utf-8")
    return tmp_path / "program.html"


def charts_drawn(tab: Page) -> list[dict[str, Any]]:
    """Each chart's figure id, laid-out size and number of drawn paths."""
    found: list[dict[str, Any]] = tab.eval_on_selector_all(
        "figure > svg.chart",
        """svgs => svgs.map(svg => {
            const box = svg.getBoundingClientRect();
            const paths = [...svg.querySelectorAll('path')].filter(p => (p.getAttribute('d') || '').length > 2);
            return {figure: svg.parentElement.id, width: box.width, height: box.height, paths: paths.length,
                    label: svg.querySelector('title')?.textContent,
                    caption: svg.parentElement.querySelector('figcaption')?.textContent};
        })""",
    )
    return found


def assert_drawn(found: list[dict[str, Any]]) -> None:
    for chart in found:
        assert chart["width"] > 200 and chart["height"] > 100, chart
        assert chart["paths"] > 0, chart
        assert chart["label"] and chart["caption"], chart


def test_program_page_and_a_stay_page_render_their_charts_without_errors(
    site: Path, opened: tuple[Page, list[str]]
) -> None:
    tab, errors = opened
    SHOTS.mkdir(exist_ok=True)
    tab.goto(site.as_uri())
    found = charts_drawn(tab)
    assert [c["figure"] for c in found] == ["census", "hours", "screens", "phq9"]
    assert_drawn(found)
    assert tab.locator("ul.figures li").count() == 15
    tab.screenshot(path=str(SHOTS / "program.png"), full_page=True)

    tab.click("text=stay-2")
    tab.wait_for_load_state("load")
    assert tab.url == (site.parent / "stays" / "stay-2.html").as_uri()
    assert tab.title() == "Stay outcomes: enrollment stay-2"
    found = charts_drawn(tab)
    assert [c["figure"] for c in found] == ["attendance", "hours", "screens", "phq9", "gad7", "craving"]
    assert_drawn(found)
    tab.screenshot(path=str(SHOTS / "patient.png"), full_page=True)
    assert errors == []
