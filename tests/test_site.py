"""The course in a real browser: Debian's Chromium driven by Playwright (never a downloaded browser).

* The static site (docs/build.py): the index and every page it links to open without a JavaScript error, a failed
  request or a request to another host; every image loads and is visible; a notebook page shows as many figures as
  its executed notebook holds and renders its saved widgets; math is typeset; no page shows a traceback or an
  overlapping-label warning. A screenshot of every page goes to data/cache/site-check/<mode>/.
* JupyterLab, headless on a local port: notebook 04 runs top to bottom (Run All) without an error output, its
  scrubber renders its figure and draws a new one, inside itself, when the step and the run change; notebook 02's
  rank explorer does the same after a slider move and a preset change; nothing lands in the log console (where a
  figure printed outside its widget goes); a probe widget that does print outside proves the log check can fail.

Which site: ``DSV3LAB_SITE=<folder with index.html>`` (``make site-check`` after ``make site``); otherwise the fast
site is built from the notebooks tests/test_notebooks.py executed (``python -m docs.build --mode fast --reuse``).
Without Chromium at /usr/bin/chromium (or ``DSV3LAB_CHROMIUM``) every test here is skipped with a message saying
so; .ci/run installs it.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urljoin, urlparse

import nbformat
import pytest

from docs.notebooks import NOTEBOOKS, ROOT, kernel_env, notebook_paths

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # slow: a Sphinx build and a browser (about 2 min)

CHROMIUM = Path(os.environ.get("DSV3LAB_CHROMIUM", "/usr/bin/chromium"))
# Flags for a closed network: no background connections, no update checks, no QUIC; a fresh profile per launch.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MISSING = (
    f"Chromium is not installed at {CHROMIUM}: the browser check of the site and of JupyterLab did NOT run. "
    "Install it with `apt-get install -y chromium chromium-driver` (.ci/run does this when apt is available)."
)
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
BAD_TEXT = ("Traceback (most recent call last)", "LayoutWarning")


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    """A browser context on a fresh profile; skipped, loudly, when Chromium is missing."""
    if not CHROMIUM.exists():
        pytest.skip(MISSING)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        yield context
        context.close()


class PageWatch:
    """Collects what a page reports: uncaught exceptions, console errors, failed requests, requests elsewhere."""

    def __init__(self, page, allowed_origin: str, aborted_ok: bool = False):
        self.problems: list[str] = []
        self.aborted_ok = aborted_ok  # JupyterLab cancels its polling requests when it reloads (net::ERR_ABORTED)
        page.on("pageerror", lambda e: self.problems.append(f"JavaScript error: {e}"))
        page.on("console", self._console)
        page.on("requestfailed", self._failed)
        page.on("response", lambda r: r.status >= 400 and self.problems.append(f"HTTP {r.status}: {r.url}"))
        page.on(
            "request",
            lambda r: (
                not r.url.startswith((allowed_origin, "data:", "blob:"))
                and self.problems.append(f"request to another host: {r.url}")
            ),
        )

    def _failed(self, request):
        if not (self.aborted_ok and request.failure == "net::ERR_ABORTED"):
            self.problems.append(f"request failed: {request.url} ({request.failure})")

    def _console(self, message):
        url = message.location.get("url", "")
        if message.type == "error" and not url.endswith("/favicon.ico"):  # the browser asks for one by itself
            self.problems.append(f"console error: {message.text} ({url})")

    def take(self) -> list[str]:
        """What was reported since the last call."""
        found, self.problems = self.problems, []
        return found


# ---------------------------------------------------------------- the static site


@pytest.fixture(scope="module")
def site() -> Path:
    """The folder holding the site's index.html: DSV3LAB_SITE, or the fast site built from the cached notebooks."""
    if not CHROMIUM.exists():
        pytest.skip(MISSING)
    if os.environ.get("DSV3LAB_SITE"):
        html = Path(os.environ["DSV3LAB_SITE"])
        assert (html / "index.html").exists(), f"DSV3LAB_SITE={html} has no index.html: run `make site` first"
        return html
    build = [sys.executable, "-m", "docs.build", "--mode", "fast", "--reuse"]
    done = subprocess.run(build, cwd=ROOT, capture_output=True, text=True)  # Sphinx's docstring warnings: on failure
    assert done.returncode == 0, f"{' '.join(build)} failed:\n{(done.stdout + done.stderr)[-5000:]}"
    print("\n" + "\n".join(line for line in done.stdout.splitlines() if line.startswith(("notebooks:", "site:"))))
    return ROOT / "data" / "cache" / "site" / "fast" / "html"


@pytest.fixture(scope="module")
def server(site):
    """The site over HTTP on a free local port."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _executed(site: Path, page: str):
    """The executed notebook a page was rendered from (None for pages that are not notebooks)."""
    src = site.parent / "src" / Path(page).with_suffix(".ipynb")
    return nbformat.read(src, as_version=4) if src.exists() else None


def _expected_figures(nb) -> tuple[int, int]:
    """(image outputs, widget views) of an executed notebook, outside widgets."""
    images = views = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            images += "image/png" in data or "image/svg+xml" in data
            views += WIDGET_VIEW in data
    return images, views


PAGE_STATE = """() => {
  const main = document.querySelector('article') || document.body;
  const imgs = [...main.querySelectorAll('img')];
  const shown = imgs.filter(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0);
  const cellImgs = [...main.querySelectorAll('.cell_output img')].filter(i => !i.closest('.jupyter-widgets'));
  return {
    images: imgs.length,
    broken: imgs.filter(i => !shown.includes(i)).map(i => i.getAttribute('src').slice(0, 80)),
    cellImages: cellImgs.filter(i => shown.includes(i)).length,
    widgetImages: [...main.querySelectorAll('.jupyter-widgets img')].filter(i => shown.includes(i)).length,
    widgetViews: main.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length,
    renderedWidgets: main.querySelectorAll('.widget-subarea > .jupyter-widgets, .jupyter-widgets.widget-vbox,'
      + ' .jupyter-widgets.widget-hbox, .jupyter-widgets.widget-output').length,
    math: main.querySelectorAll('.math').length,
    typeset: [...main.querySelectorAll('.math')].filter(m => m.querySelector('mjx-container')).length,
    mathErrors: main.querySelectorAll('mjx-merror').length,
    outputs: [...main.querySelectorAll('.cell_output')].map(e => e.innerText).join('\\n'),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  };
}"""


def _crawl(chromium, server: str, shots: Path) -> dict[str, dict]:
    """Open the index, then every page of the site it links to (breadth first); what each page showed."""
    seen, queue, results = set(), ["index.html"], {}
    page = chromium.new_page()  # one page for every URL (faster than a page each)
    watch = PageWatch(page, server)
    while queue:
        rel = queue.pop(0)
        if rel in seen:
            continue
        seen.add(rel)
        page.goto(urljoin(server, rel), wait_until="load")
        if page.locator(".math").count():  # MathJax typesets after load
            page.wait_for_function(
                "() => [...document.querySelectorAll('.math')].every(m => m.querySelector('mjx-container'))",
                timeout=20_000,
            )
        if page.locator(f'script[type="{WIDGET_VIEW}"]').count():  # the widget manager renders after load
            page.wait_for_selector(".jupyter-widgets", timeout=20_000)
        state = page.evaluate(PAGE_STATE)
        name = rel.replace("/", "__").removesuffix(".html")
        if not rel.startswith("api/"):  # the module pages are text: one screenshot of the API index is enough
            page.screenshot(path=str(shots / f"{name}.png"))
        widget_figures = page.locator(".cell_output", has=page.locator(".jupyter-widgets img"))
        if widget_figures.count():  # the last saved widget that shows a figure, alone
            widget_figures.last.scroll_into_view_if_needed()
            widget_figures.last.screenshot(path=str(shots / f"{name}__widget.png"))
        state["problems"] = watch.take()
        results[rel] = state
        for link in state.pop("links"):
            url = urlparse(link)
            if link.startswith(server) and url.path.endswith(".html"):
                queue.append(url.path.removeprefix(urlparse(server).path))
    page.close()
    return results


@pytest.fixture(scope="module")
def crawled(chromium, server, site):
    shots = ROOT / "data" / "cache" / "site-check" / site.parent.name  # default or fast for the sites docs.build makes
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    t0 = time.perf_counter()
    results = _crawl(chromium, server, shots)
    print(f"\nsite check: {len(results)} pages in {time.perf_counter() - t0:.0f} s, screenshots in {shots}")
    return results


def test_every_page_opens_cleanly(crawled):
    bad = {page: r["problems"] for page, r in crawled.items() if r["problems"]}
    assert not bad, json.dumps(bad, indent=1)[:4000]
    shown = {page: [t for t in BAD_TEXT if t in r["outputs"]] for page, r in crawled.items()}
    assert not {p: t for p, t in shown.items() if t}, f"outputs showing errors or overlapping labels: {shown}"


def test_every_page_is_reached(crawled, site):
    expected = {"index.html", "figures/REPORT.html", "api.html"}
    expected |= {f"notebooks/{p.relative_to(NOTEBOOKS).with_suffix('.html')}" for p in notebook_paths()}
    assert expected <= set(crawled), f"not linked from the index: {sorted(expected - set(crawled))}"
    assert any(p.startswith("api/dsv3lab.model") for p in crawled), "the API reference has no module pages"


def test_every_image_loads_and_math_is_typeset(crawled):
    broken = {p: r["broken"] for p, r in crawled.items() if r["broken"]}
    assert not broken, f"images that did not load or are not visible: {broken}"
    untypeset = {p: (r["typeset"], r["math"], r["mathErrors"]) for p, r in crawled.items()}
    assert all(t == m and e == 0 for t, m, e in untypeset.values()), {
        p: v for p, v in untypeset.items() if v[0] != v[1] or v[2]
    }


def test_pages_show_their_figures(crawled, site):
    """A notebook page shows every figure its executed notebook holds and renders its widgets; the README and
    REPORT.md pages show every image they reference."""
    for src, page in (("README.md", "index.html"), ("figures/REPORT.md", "figures/REPORT.html")):
        n = (ROOT / src).read_text().count("![")
        assert crawled[page]["images"] >= n > 0, f"{page}: {crawled[page]['images']} images, {src} has {n}"
    for path in notebook_paths():
        page = f"notebooks/{path.relative_to(NOTEBOOKS).with_suffix('.html')}"
        images, views = _expected_figures(_executed(site, page))
        r = crawled[page]
        assert r["cellImages"] == images, f"{page}: {r['cellImages']} figures shown, the notebook has {images}"
        assert r["widgetViews"] == 0 or r["renderedWidgets"] >= 1, f"{page}: widgets not rendered"
        assert r["widgetViews"] >= views, f"{page}: {r['widgetViews']} widget views, the notebook has {views}"
    scrubber = crawled["notebooks/04_load_balancing.html"]
    assert scrubber["widgetImages"] >= 1, "notebook 04's saved scrubber shows no figure"


# ---------------------------------------------------------------- JupyterLab


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a local port, serving a scratch copy of notebooks/ (autosave never touches the checkout), the
    kernels in fast mode with the layout hook; yields the base URL with the token."""
    if not CHROMIUM.exists():
        pytest.skip(MISSING)
    tmp = tmp_path_factory.mktemp("lab")
    shutil.copytree(NOTEBOOKS, tmp / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    settings = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)  # no news or update checks: the network is closed
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    env = kernel_env("fast", tmp / "kernel") | {
        "JUPYTER_CONFIG_DIR": str(tmp / "config"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"),
        "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
    }
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}"]
    cmd += [f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp}", "--LabApp.news_url=None"]
    cmd += ["--LabApp.extension_manager=readonly"]
    log = open(tmp / "lab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(120):
            assert proc.poll() is None, f"JupyterLab exited: {(tmp / 'lab.log').read_text()[-2000:]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", token, tmp
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _open_notebook(chromium, lab, name: str):
    base, token, _ = lab
    page = chromium.new_page()
    watch = PageWatch(page, base, aborted_ok=True)
    page.goto(f"{base}/lab/tree/notebooks/{name}?reset&token={token}")  # reset: no layout from an earlier page
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    page.wait_for_function("document.body.innerText.includes('| Idle')", timeout=60_000)  # the kernel is up
    return page, watch


def _menu(page, menu: str, item: str):
    page.locator(".lm-MenuBar-itemLabel", has_text=menu).click()
    page.get_by_text(item, exact=True).click()


def _log_entries(page) -> list[str]:
    """The entries of JupyterLab's log console (outputs that belong to no cell: a figure printed outside its widget
    lands there), as text; a figure reads as its alt text or '<image>'."""
    panel = page.locator(".jp-LogConsolePanel")
    if not panel.is_visible():  # the menu item toggles the panel
        _menu(page, "View", "Show Log Console")
    panel.wait_for(timeout=10_000)
    page.wait_for_timeout(300)
    entries = panel.locator(".jp-OutputArea-child")
    return [(e.inner_text().strip() or "") + (" <image>" if e.locator("img").count() else "") for e in entries.all()]


def _widget_png(box) -> str:
    """The one figure a widget shows (its data URL); fails when it shows none (a figure that escaped) or several."""
    imgs = box.locator("img")
    assert imgs.count() == 1, f"the widget shows {imgs.count()} figures, expected 1"
    return imgs.first.get_attribute("src")


def _settle(page, timeout_ms: int = 120_000):
    """Wait until the kernel has handled everything the page sent it (busy while a slider's callback redraws)."""
    page.wait_for_timeout(500)
    page.wait_for_function("document.body.innerText.includes('| Idle')", timeout=timeout_ms)
    page.wait_for_timeout(300)  # the last state update reaches the widget view


ERROR_OUTPUT = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"] .ansi-red-fg'


def _wait_for_widget_or_error(page, widget, timeout_s: float = 240):
    """Run All stops at a cell that raises: wait for the widget, but fail at once on an error output."""
    t0 = time.time()
    while widget.count() == 0:
        errors = page.locator(ERROR_OUTPUT)
        assert errors.count() == 0, f"a cell raised: {errors.first.inner_text()[:2000]}"
        assert time.time() - t0 < timeout_s, f"no widget after {timeout_s:.0f} s"
        page.wait_for_timeout(500)


def _no_error_outputs(page):
    errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
    texts = [t for t in errors.all_inner_texts() if any(b in t for b in BAD_TEXT)]
    tracebacks = page.locator(ERROR_OUTPUT)
    assert not texts and tracebacks.count() == 0, texts or tracebacks.first.inner_text()[:2000]


def test_jupyterlab_runs_04_and_its_scrubber_responds(chromium, lab):
    page, watch = _open_notebook(chromium, lab, "04_load_balancing.ipynb")
    t0 = time.perf_counter()
    _menu(page, "Run", "Run All Cells")
    scrubber = page.locator(".jp-OutputArea-output .widget-vbox", has=page.locator(".widget-label", has_text="step"))
    _wait_for_widget_or_error(page, scrubber)
    _settle(page)
    print(f"\nJupyterLab: notebook 04 ran in {time.perf_counter() - t0:.0f} s")
    _no_error_outputs(page)
    scrubber.scroll_into_view_if_needed()
    first = _widget_png(scrubber)
    step = scrubber.locator(".widget-hslider", has=page.locator(".widget-label", has_text="step"))
    step.locator(".noUi-handle, .ui-slider-handle").first.focus()
    for _ in range(5):
        page.keyboard.press("ArrowLeft")
    _settle(page)
    moved = _widget_png(scrubber)
    assert moved != first, "the scrubber did not redraw when the step changed"
    scrubber.locator("select").select_option("none")
    _settle(page)
    assert _widget_png(scrubber) not in (first, moved), "the scrubber did not redraw when the run changed"
    page.screenshot(path=str(lab[2] / "04.png"))
    shutil.copyfile(lab[2] / "04.png", _shots() / "jupyterlab_04_scrubber.png")
    assert _log_entries(page) == [], "a figure or message went to the log console instead of its widget"
    assert not watch.problems, watch.problems
    page.close()


def test_jupyterlab_rank_explorer_keeps_its_figure(chromium, lab):
    """Notebook 02's rank explorer (issue 16 §5): a slider move, then a preset change, each redraw inside the
    widget. Only the explorer's cell runs: it is self-contained (an import and a call), and the rest of 02 is
    already executed by tests/test_notebooks.py."""
    page, watch = _open_notebook(chromium, lab, "02_mla.ipynb")
    t0 = time.perf_counter()
    cell = page.locator(".jp-Cell", has=page.locator(".jp-InputArea", has_text="kv_rank_explorer(")).last
    cell.scroll_into_view_if_needed()
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")
    box = cell.locator(".jp-OutputArea-output .widget-vbox").first
    box.wait_for(timeout=120_000)
    _settle(page)
    print(f"\nJupyterLab: notebook 02's explorer cell ran in {time.perf_counter() - t0:.0f} s")
    _no_error_outputs(page)
    box.scroll_into_view_if_needed()
    first = _widget_png(box)
    handle = box.locator(".widget-hslider", has=page.locator(".widget-label", has_text="d_c"))
    handle.locator(".noUi-handle, .ui-slider-handle").first.focus()
    page.keyboard.press("ArrowLeft")
    _settle(page)
    moved = _widget_png(box)
    assert moved != first, "the explorer did not redraw when d_c moved"
    box.locator("select").select_option("toy")
    _settle(page)
    assert _widget_png(box) not in (first, moved), "the explorer did not redraw when the preset changed"
    assert "d_c=64" in box.inner_text() and "d_h^R=16" in box.inner_text(), box.inner_text()
    page.screenshot(path=str(_shots() / "jupyterlab_02_rank_explorer.png"))
    assert _log_entries(page) == [], "a figure or message went to the log console instead of its widget"
    assert not watch.problems, watch.problems
    page.close()


def _shots() -> Path:
    shots = ROOT / "data" / "cache" / "site-check" / "jupyterlab"
    shots.mkdir(parents=True, exist_ok=True)
    return shots


PROBE = """import ipywidgets as w
import matplotlib.pyplot as plt
from IPython.display import display

probe = w.IntSlider(description="probe")


def escape(change):
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, change["new"]])
    display(fig)  # inside no Output widget: JupyterLab sends it to the log console
    plt.close(fig)


probe.observe(escape, names="value")
probe"""


def test_jupyterlab_checks_see_an_escaped_figure_and_an_error(chromium, lab):
    """The checks above can fail: a slider whose callback displays a figure outside any output widget puts an entry
    in the log console, and _log_entries counts it; a cell that raises is seen by _no_error_outputs."""
    cells = [nbformat.v4.new_code_cell(PROBE), nbformat.v4.new_code_cell('raise ValueError("probe error")')]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, lab[2] / "notebooks" / "escape_probe.ipynb")
    page, _ = _open_notebook(chromium, lab, "escape_probe.ipynb")
    page.locator(".jp-Cell .jp-InputArea-editor").first.click()
    page.keyboard.press("Shift+Enter")
    slider = page.locator(".jp-OutputArea-output .widget-hslider").first
    slider.wait_for(timeout=60_000)
    _settle(page)
    slider.locator(".noUi-handle, .ui-slider-handle").first.focus()
    page.keyboard.press("ArrowRight")
    _settle(page)
    assert any("<image>" in e for e in _log_entries(page)), "the escaped figure is not in the log console"
    page.locator(".jp-Cell .jp-InputArea-editor").last.click()  # the second cell raises
    page.keyboard.press("Shift+Enter")
    _settle(page)
    with pytest.raises(AssertionError, match="probe error"):
        _no_error_outputs(page)
    page.close()
