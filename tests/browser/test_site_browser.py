"""The course site (docs/build.py, `make site`) in a real browser, offline: Debian's Chromium over file://.

Builds the site into a temporary folder, opens every page once and records what it loaded and showed;
the tests below check that record: nothing requested from the network or failed to load, no script
error, every image drawn, every formula typeset by MathJax, the saved attention explorer shown on
notebooks 03 and 04, every notebook a chapter in order, every public module an API page. Skipped when
Chromium or Playwright is missing (`.ci/run` installs Chromium, so CI always runs it) and on Python 3.10
(Sphinx 9 needs 3.11: pyproject's docs extra installs nothing there).
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}"),
              pytest.mark.skipif(sys.version_info < (3, 11), reason="the site's Sphinx 9 needs Python 3.11+")]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXPLORER_NOTEBOOKS = ["03_image_classification", "04_masked_language_model"]

# Run in the page once it has loaded: wait for MathJax's first typesetting and for every saved widget
# to be drawn, then describe the page.
SETTLE = """async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  const views = document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length;
  for (let i = 0; i < 300 && document.querySelectorAll('.widget-subarea > *').length < views; i++)
    await new Promise(r => setTimeout(r, 100));
  await Promise.all(Array.from(document.images).map(img => img.complete ? null : img.decode().catch(() => null)));
}"""
DESCRIBE = """() => {
  const text = [];                       // what a reader sees as text, outside code and typeset math
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {acceptNode: node =>
    node.parentElement.closest('pre, code, script, style, mjx-container, .highlight')
      ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT});
  while (walker.nextNode()) text.push(walker.currentNode.textContent);
  const box = img => { const r = img.getBoundingClientRect(); return [r.width, r.height]; };
  return {
    images: Array.from(document.images).map(img => ({src: img.getAttribute('src'), width: img.naturalWidth})),
    math: document.querySelectorAll('.math').length,
    untypeset: Array.from(document.querySelectorAll('.math')).filter(m => !m.querySelector('mjx-container'))
                    .map(m => m.textContent.slice(0, 60)),
    typeset: document.querySelectorAll('mjx-container').length,
    text: text.join(' '),
    widget_views: document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length,
    widgets_drawn: document.querySelectorAll('.widget-subarea > *').length,
    explorer_images: Array.from(document.querySelectorAll('.percnb-attention-explorer img')).map(img => ({
      src: img.getAttribute('src').slice(0, 5), width: img.naturalWidth, shown: box(img)})),
    static_notes: Array.from(document.querySelectorAll('.percnb-static-widget')).map(n => n.textContent),
    badges: Array.from(document.querySelectorAll('a[href^="https://colab.research.google.com/"] img'))
              .map(img => img.getAttribute('src')),
    chapters: Array.from(document.querySelectorAll('.percnb-course a')).map(a => [a.getAttribute('href'),
                                                                               a.textContent.trim()]),
    course_rows: Array.from(document.querySelectorAll('.percnb-course tbody tr'))
                   .map(tr => Array.from(tr.cells).map(td => td.textContent.trim())),
    links: Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href')),
  };
}"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Build the site as `make site` does and open every page once: {page path: what it did and showed}."""
    if importlib.util.find_spec("myst_nb") is None:
        pytest.fail("the site needs percnb's docs extra: pip install -e '.[docs]' (make test installs it)")
    out = tmp_path_factory.mktemp("site") / "html"
    subprocess.run([sys.executable, str(ROOT / "docs" / "build.py"), str(out)], check=True, timeout=600)
    pages = sorted(p for p in out.rglob("*.html") if not {"_static", "_sources", ".doctrees"} & set(p.parts))
    record = {}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            for path in pages:
                page = browser.new_page(viewport={"width": 1300, "height": 900})
                events = {"failed": [], "remote": [], "errors": []}
                page.on("requestfailed", lambda r, e=events: e["failed"].append(f"{r.url} ({r.failure})"))
                page.on("request", lambda r, e=events: None if r.url.startswith(("file:", "data:", "blob:"))
                        else e["remote"].append(r.url))
                page.on("console", lambda m, e=events: e["errors"].append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda err, e=events: e["errors"].append(str(err)))
                page.goto(path.as_uri(), wait_until="load")
                page.evaluate(SETTLE)
                record[path.relative_to(out).as_posix()] = {**page.evaluate(DESCRIBE), **events}
                page.close()
        finally:
            browser.close()
    return record


def _title_cell(notebook: Path) -> str:
    return "".join(json.loads(notebook.read_text())["cells"][0]["source"])


def test_every_page_loads_offline_without_errors(site):
    problems = {name: {k: page[k] for k in ("failed", "remote", "errors") if page[k]} for name, page in site.items()}
    assert {"index.html", "notebooks/01_attention_blocks.html"} <= set(site)
    assert not {name: p for name, p in problems.items() if p}


def test_every_image_is_drawn(site):
    broken = {name: [img["src"] for img in page["images"] if img["width"] == 0] for name, page in site.items()}
    assert not {name: srcs for name, srcs in broken.items() if srcs}


def test_colab_badge_image_is_served_by_the_site(site):
    badges = [src for page in site.values() for src in page["badges"]]
    assert len(badges) == len(NOTEBOOKS)
    assert all(not re.match(r"\w+://", src) and src.endswith(".svg") for src in badges), badges


def test_math_is_typeset_by_mathjax(site):
    with_math = {name: page for name, page in site.items() if page["math"]}
    assert "notebooks/01_attention_blocks.html" in with_math      # the notebooks write formulas: not vacuous
    assert not {name: page["untypeset"] for name, page in with_math.items() if page["untypeset"]}
    assert all(page["typeset"] >= page["math"] for page in with_math.values())
    raw = {name: re.findall(r".{0,30}(?:\\\(|\\\[|\$\$).{0,30}", page["text"]) for name, page in site.items()}
    assert not {name: found for name, found in raw.items() if found}, "TeX left as text"


def test_saved_widgets_are_drawn_with_a_note_that_the_page_has_no_kernel(site):
    for name, page in site.items():
        assert page["widgets_drawn"] >= page["widget_views"], name
    for stem in EXPLORER_NOTEBOOKS:
        page = site[f"notebooks/{stem}.html"]
        assert page["static_notes"] and all("make lab" in note for note in page["static_notes"]), stem


@pytest.mark.parametrize("stem", EXPLORER_NOTEBOOKS)
def test_the_explorer_shows_its_saved_image(site, stem):
    images = site[f"notebooks/{stem}.html"]["explorer_images"]
    assert len(images) == 1, images
    image = images[0]
    assert image["src"] == "blob:" and image["width"] > 0 and min(image["shown"]) > 0, image


def test_index_lists_every_notebook_in_order_with_its_run_time(site):
    index = site["index.html"]
    assert [href for href, _ in index["chapters"]] == [f"notebooks/{nb.stem}.html" for nb in NOTEBOOKS]
    for notebook, row in zip(NOTEBOOKS, index["course_rows"]):
        runs_in = re.search(r"\*\*Runs in:\*\* (about \d+ minutes?)", _title_cell(notebook)).group(1)
        assert row[0].startswith(notebook.name[:2] + " · ") and row[-1] == runs_in, (notebook.name, row)
    chapters = [link for link in index["links"] if re.fullmatch(r"notebooks/\d\d_\w+\.html", link)]
    assert sorted(set(chapters)) == [f"notebooks/{nb.stem}.html" for nb in NOTEBOOKS]


def test_api_reference_has_a_page_for_every_public_module(site):
    modules = set()
    for path in (ROOT / "percnb").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if not any(part.startswith("_") for part in parts):
            modules.add(".".join(parts))
    assert {f"api/{m}.html" for m in modules} <= set(site), sorted(modules)
    assert all(f"{m}.html" in site["api/index.html"]["links"] for m in modules)
