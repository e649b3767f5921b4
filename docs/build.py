"""Build the course's static site: ``python -m docs.build [--mode default|fast] [--reuse] [--jobs N] [--out DIR]``.

1. Execute every notebook (docs/notebooks.py: ``notebooks/NN_*.ipynb`` and ``notebooks/solutions/*.ipynb``) in a
   fresh kernel, default mode unless ``--mode fast``; with ``--reuse``, take the executed copy that
   tests/test_notebooks.py left under data/cache/notebooks/<mode>/ where it was made from the notebook as it is now.
   An executed notebook with an error output or an overlapping-label warning stops the build.
2. Assemble a Sphinx source folder: README.md as the index, figures/ (REPORT.md and its PNGs), the executed
   notebooks, and an API page generated from the library's docstrings (autosummary, every module of ``dsv3lab``).
3. Copy MathJax 3 and the Jupyter widget manager (``@jupyter-widgets/html-manager``'s standalone ``embed.js``) into
   _static, from the npm registry at pinned versions checked against their published sha512, cached under
   data/cache/site-assets/: the pages then load nothing from other hosts.
4. ``sphinx-build`` with myst-nb (docs/conf.py) into ``<out>/html``.

The output is ``data/cache/site/<mode>/html/index.html`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .notebooks import MODES, NOTEBOOKS, ROOT, cached, execute, executed_path, notebook_paths, problems

SITE_CACHE = ROOT / "data" / "cache" / "site"
ASSETS_CACHE = ROOT / "data" / "cache" / "site-assets"
# npm packages the pages load, pinned with the registry's sha512 (npm pack --json prints it); files kept from each.
ASSETS = {
    "mathjax": {
        "version": "3.2.2",
        "integrity": "sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw==",
        # tex-chtml.js, and what it loads relative to itself: fonts, TeX extensions (autoload), menu, accessibility
        "keep": ("es5/tex-chtml.js", "es5/output/chtml/", "es5/input/tex/extensions/", "es5/ui/", "es5/a11y/"),
        "into": "mathjax",
        "strip": "es5/",
    },
    "@jupyter-widgets/html-manager": {
        "version": "1.0.15",
        "integrity": "sha512-5thBIV6ymNgmPVOHvzx+gGy8ZSKmSazhtGw4/c4xJDVzRhG9PTeQsRjF3FUTopvFi//SABeNz1yp47bCrJ3CQA==",
        "keep": ("dist/embed.js", "dist/embed.js.LICENSE.txt", "dist/*.woff", "dist/*.woff2", "dist/*.ttf"),
        "into": "widgets",
        "strip": "dist/",
    },
}

INDEX_TOC = """

```{{toctree}}
:hidden:
:caption: Notebooks
:glob:

{notebooks}
```

```{{toctree}}
:hidden:
:caption: Results and reference

figures/REPORT
api
```
"""

API_PAGE = """API reference
=============

Every module of the library, from its docstrings. The paper section each module implements is in its docstring; the
library map in the :doc:`README <index>` says which notebook explains it.

.. autosummary::
   :toctree: api
   :recursive:

   dsv3lab
"""


def fetch_asset(name: str, spec: dict, cache: Path = ASSETS_CACHE) -> Path:
    """The npm tarball of ``name@version`` (``npm pack`` into ``cache``), its sha512 checked against the pin."""
    cache.mkdir(parents=True, exist_ok=True)
    tgz = cache / (name.lstrip("@").replace("/", "-") + f"-{spec['version']}.tgz")
    if not tgz.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise SystemExit(
                f"npm is needed once to fetch {name}@{spec['version']} into {cache} (the pages serve MathJax and the "
                "widget manager themselves); install Node.js/npm, or put the tarball there"
            )
        subprocess.run(
            [npm, "pack", "--silent", f"{name}@{spec['version']}", "--pack-destination", str(cache)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    digest = "sha512-" + base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode()
    if digest != spec["integrity"]:
        tgz.unlink()
        raise SystemExit(f"{tgz.name}: sha512 {digest} is not the pinned {spec['integrity']}; removed it")
    return tgz


def install_assets(static: Path) -> None:
    """Unpack the pinned files of every asset into ``static`` (source maps left out)."""
    for name, spec in ASSETS.items():
        with tarfile.open(fetch_asset(name, spec)) as tar:
            for member in tar.getmembers():
                rel = member.name.removeprefix("package/")
                if not member.isfile() or not any(
                    fnmatch.fnmatch(rel, k + ("*" if k.endswith("/") else "")) for k in spec["keep"]
                ):
                    continue
                target = static / spec["into"] / rel.removeprefix(spec["strip"])
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())


def executed_notebooks(mode: str, reuse: bool, jobs: int) -> dict[Path, object]:
    """Every notebook executed in ``mode`` (or its fresh cached copy with ``reuse``), checked for problems."""
    paths = notebook_paths()
    done = {p: cached(p, mode) if reuse else None for p in paths}
    done = {p: nb if nb is not None and not problems(nb) else None for p, nb in done.items()}  # else run again
    todo = [p for p, nb in done.items() if nb is None]
    print(f"notebooks: {len(paths)} ({len(paths) - len(todo)} reused, {len(todo)} to execute in {mode} mode)")

    def run(path):
        nb, seconds = execute(path, mode)
        print(f"  {path.relative_to(NOTEBOOKS)}: {seconds:.0f} s", flush=True)
        return nb

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for path, nb in zip(todo, pool.map(run, todo)):
            done[path] = nb
    bad = {p.name: problems(nb) for p, nb in done.items() if problems(nb)}
    if bad:
        raise SystemExit("executed notebooks show problems:\n" + "\n".join(f"  {k}: {v}" for k, v in bad.items()))
    return done


def assemble(src: Path, mode: str, reuse: bool, jobs: int) -> None:
    """The Sphinx source folder: index (README + table of contents, docs/*.png), figures/, notebooks/, api, conf,
    _static."""
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    notebooks = executed_notebooks(mode, reuse, jobs)
    for path in notebooks:
        target = src / "notebooks" / path.relative_to(NOTEBOOKS)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(executed_path(path, mode), target)
    # figures/sections/ are the parts REPORT.md is assembled from: REPORT.md alone is the page
    shutil.copytree(ROOT / "figures", src / "figures", ignore=shutil.ignore_patterns("*.csv", "*.json", "sections"))
    toc = "\n".join(f"notebooks/{p.relative_to(NOTEBOOKS).with_suffix('')}" for p in notebooks)
    (src / "index.md").write_text((ROOT / "README.md").read_text() + INDEX_TOC.format(notebooks=toc))
    (src / "docs").mkdir()
    for png in (ROOT / "docs").glob("*.png"):  # the README's screenshot
        shutil.copyfile(png, src / "docs" / png.name)
    (src / "api.rst").write_text(API_PAGE)
    shutil.copyfile(ROOT / "docs" / "conf.py", src / "conf.py")
    shutil.copytree(ROOT / "docs" / "_static", src / "_static")
    install_assets(src / "_static")


def build(mode: str = "default", out: Path | None = None, reuse: bool = False, jobs: int = 2) -> Path:
    """Execute, assemble and render; returns the folder holding index.html."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out = out or SITE_CACHE / mode
    t0 = time.perf_counter()
    assemble(out / "src", mode, reuse, jobs)
    t1 = time.perf_counter()
    html = out / "html"
    subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-j", "1", str(out / "src"), str(html)],
        check=True,
        cwd=ROOT,
    )
    print(
        f"site: {html / 'index.html'} (notebooks and sources {t1 - t0:.0f} s, sphinx {time.perf_counter() - t1:.0f} s)"
    )
    return html


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m docs.build", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="default", help="notebook mode (default: default)")
    parser.add_argument("--out", type=Path, help="output folder (default: data/cache/site/<mode>)")
    parser.add_argument("--reuse", action="store_true", help="reuse executed notebooks made from the current source")
    parser.add_argument("--jobs", type=int, default=2, help="notebooks executed at once (default: 2)")
    args = parser.parse_args(argv)
    build(args.mode, args.out, args.reuse, args.jobs)


if __name__ == "__main__":
    main()
