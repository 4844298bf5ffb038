"""The pages in a real browser: headless Chromium (Debian's ``chromium``, which ``.ci/run`` installs) driven by
Playwright opens the probe page of a 100-layer net, a check page and a 5-method compare page from disk, in
light and dark, and must see no console error, no request outside the file, and a full, non-blank page.

Screenshots go to ``$FTDOCTOR_SCREENSHOTS`` when it is set (to look at them), else to the test's folder.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (test extra)")
CHROMIUM = os.environ.get("FTDOCTOR_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no Chromium on this machine: install Debian's chromium (.ci/run does)", allow_module_level=True)

#: as the machine's notes say: no sandbox as root, and none of Chromium's own background connections
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
WIDTH = 1280


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def open_page(browser, path: Path, scheme: str, shots: Path) -> dict:
    page = browser.new_page(viewport={"width": WIDTH, "height": 900}, color_scheme=scheme)
    seen: dict = {"console": [], "requests": []}
    page.on("console", lambda m: seen["console"].append((m.type, m.text)) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: seen["console"].append(("pageerror", str(e))))
    page.on("request", lambda r: seen["requests"].append(r.url))
    url = path.resolve().as_uri()
    page.goto(url, wait_until="load")
    seen["requests"] = [u for u in seen["requests"] if u != url and not u.startswith("data:")]
    seen["size"] = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    seen["charts"] = page.evaluate("document.querySelectorAll('figure.chart svg').length")
    shot = shots / f"{path.stem}-{scheme}.png"
    page.screenshot(path=str(shot), full_page=True)
    seen["shot"] = shot
    page.close()
    return seen


def pixels(path: Path) -> np.ndarray:
    from matplotlib.image import imread
    return imread(str(path))[..., :3]


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("kind", ["probe", "check", "compare", "trace"])
def test_page_renders_in_chromium_with_no_error_and_no_outside_request(browser, report_pages, kind, scheme,
                                                                       tmp_path):
    shots = Path(os.environ.get("FTDOCTOR_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    seen = open_page(browser, report_pages[kind], scheme, shots)
    assert seen["console"] == []
    assert seen["requests"] == []
    width, height = seen["size"]
    assert width <= WIDTH                             # nothing wider than the window: wide tables scroll inside
    assert height > {"probe": 3000, "check": 1500, "compare": 2000, "trace": 1500}[kind]
    assert seen["charts"] >= {"probe": 2, "check": 1, "compare": 7, "trace": 3}[kind]
    img = pixels(seen["shot"])
    assert img.shape[1] == WIDTH and img.shape[0] >= height - 2
    assert img.std() > 0.05                            # not blank
    assert len(np.unique((img[::7, ::7] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 200


def test_a_command_is_copied_with_its_button(browser, report_pages):
    """The copy button puts the suggested command on the clipboard (or selects it where the clipboard is shut)."""
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(report_pages["probe"].resolve().as_uri())
    if page.locator("button.copy").count() == 0:
        pytest.skip("the probe found nothing to suggest")
    page.locator("button.copy").first.click()
    page.wait_for_timeout(200)
    label = page.locator("button.copy").first.text_content()
    assert label in ("copied", "selected: Ctrl+C") and errors == []
    page.close()


def test_page_prints_with_every_section_open(browser, report_pages, tmp_path):
    """Printing (to PDF here) opens the folded sections and drops the scroll boxes: more pages than the
    screen view's folded content would make."""
    page = browser.new_page()
    page.goto(report_pages["probe"].resolve().as_uri())
    closed = page.evaluate("document.querySelectorAll('details:not([open])').length")
    assert closed >= 1                                       # 100 layers: the per-layer tables start folded
    page.evaluate("window.dispatchEvent(new Event('beforeprint'))")
    assert page.evaluate("document.querySelectorAll('details:not([open])').length") == 0
    page.emulate_media(media="print")
    assert page.evaluate("getComputedStyle(document.querySelector('figure.chart.tall')).maxHeight") == "none"
    pdf = tmp_path / "probe.pdf"
    page.pdf(path=str(pdf))
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 50_000
    page.close()
