"""Execute the course's notebooks the way the tests and the site need them, and check what they printed.

One place for: which notebooks there are (every ``notebooks/NN_*.ipynb`` and ``notebooks/solutions/*.ipynb``), how
a notebook is executed (a fresh kernel with the inline backend, fast or default mode, the figure-layout hook of
:mod:`dsv3lab.viz.layout` switched on), where an executed copy is kept (``data/cache/notebooks/<mode>/``, with the
source's hash, so that the site builder reuses what ``tests/test_notebooks.py`` already executed), and what an
executed notebook must not contain (error outputs, overlapping-label warnings, figures printed outside a cell's
own outputs).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CACHE = ROOT / "data" / "cache" / "notebooks"
MODES = ("fast", "default")
# rcParams for every kernel: each pyplot figure warns (LayoutWarning) when its labels overlap after a draw.
MATPLOTLIBRC = "figure.hooks: dsv3lab.viz.layout:warn_on_overlaps\n"
LAYOUT_WARNING = "LayoutWarning"


def notebook_paths(root: Path = NOTEBOOKS) -> list[Path]:
    """Every numbered notebook, then every solution notebook, in name order."""
    return sorted(root.glob("[0-9][0-9]_*.ipynb")) + sorted((root / "solutions").glob("*.ipynb"))


def source_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def executed_path(path: Path, mode: str, cache: Path = CACHE) -> Path:
    """Where the executed copy of ``path`` is kept: ``cache/<mode>/<path relative to notebooks/>``."""
    return cache / mode / path.resolve().relative_to(NOTEBOOKS)


def kernel_env(mode: str, scratch: Path) -> dict[str, str]:
    """The kernel's environment: fast mode or not, the inline backend (never a leftover ``MPLBACKEND=Agg``, which
    would drop every figure), the layout hook through a ``matplotlibrc`` in ``scratch``, this checkout first on
    ``PYTHONPATH``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    scratch.mkdir(parents=True, exist_ok=True)
    rc = scratch / "matplotlibrc"
    rc.write_text(MATPLOTLIBRC)
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "DSV3LAB_FAST")}
    if mode == "fast":
        env["DSV3LAB_FAST"] = "1"
    env["MATPLOTLIBRC"] = str(rc)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def execute(path: Path, mode: str, cache: Path = CACHE, timeout: int = 600) -> tuple[nbformat.NotebookNode, float]:
    """Run ``path`` top to bottom in a fresh kernel (cwd: its folder), keep the executed copy with its widget state
    under ``cache``, and return it with the seconds it took. A cell that raises raises here."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    target = executed_path(path, mode, cache)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )  # store_widget_state is on by default: the widgets' state goes into the notebook's metadata
    t0 = time.perf_counter()
    client.execute(env=kernel_env(mode, cache / "kernel"))
    seconds = time.perf_counter() - t0
    nb.metadata["dsv3lab"] = {"source_sha256": source_hash(path), "mode": mode, "seconds": round(seconds, 1)}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    nbformat.write(nb, tmp)
    tmp.replace(target)
    return nb, seconds


def cached(path: Path, mode: str, cache: Path = CACHE) -> nbformat.NotebookNode | None:
    """The executed copy of ``path`` in ``mode`` if it was made from the notebook as it is now, else None."""
    target = executed_path(path, mode, cache)
    if not target.exists():
        return None
    nb = nbformat.read(target, as_version=4)
    meta = nb.metadata.get("dsv3lab", {})
    return nb if meta.get("source_sha256") == source_hash(path) and meta.get("mode") == mode else None


def problems(nb: nbformat.NotebookNode) -> list[str]:
    """What an executed notebook must not show: error outputs and overlapping-label warnings, one line each with
    the cell's number."""
    found = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found.append(f"cell {i}: error {out.get('ename')}: {out.get('evalue')}")
            text = out.get("text", "") if out.get("output_type") == "stream" else ""
            if LAYOUT_WARNING in text:
                found.append(f"cell {i}: {text.strip()[:300]}")
    return found
