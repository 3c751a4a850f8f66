"""The HTML reports in a real browser: Debian's headless Chromium driven by Playwright.

No browser can be downloaded here, so Playwright is pointed at /usr/bin/chromium (.ci/run
installs it); without it these tests skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cxrlab.reporting.report import SECTIONS_ABLATION, SECTIONS_RUN, write_report

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


def check_page(browser, html: Path, sections: tuple[str, ...]) -> None:
    page = browser.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(html.resolve().as_uri(), wait_until="load")
    for sid in sections:
        el = page.locator(f"section#{sid}")
        assert el.count() == 1, sid
        assert el.locator("h2").inner_text().strip(), sid
    n_images = page.evaluate("document.images.length")
    broken = page.evaluate("Array.from(document.images)"
                           ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt)")
    assert n_images > 0 and broken == []
    # nothing fetched but the file itself (data: URLs are not requests)
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    page.close()


def test_run_report_in_chromium(browser, tiny_sweep, tmp_path):
    out = write_report(tiny_sweep.b / "runs" / tiny_sweep.first_run, tmp_path / "run.html")
    check_page(browser, out, SECTIONS_RUN)


def test_ablation_report_in_chromium(browser, tiny_sweep, tmp_path):
    out = write_report(tiny_sweep.b, tmp_path / "ablation.html")
    check_page(browser, out, SECTIONS_ABLATION)
