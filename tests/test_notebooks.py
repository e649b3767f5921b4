"""Every notebook runs top to bottom in a fresh kernel in fast mode, and is committed without outputs.

The fast-mode limit (DESIGN.md: <= 60 s per notebook on a 2-core CPU) is measured and reported at the end of the
session (and in data/cache/notebook_times.json), not asserted: a shared machine's speed varies. nbclient's per-cell
timeout and pytest-timeout guard against a hang. Executed copies are kept in data/cache/executed/ for the site check.
"""

import json
import os
import time
from pathlib import Path

import pytest

from helpers import NOTEBOOK_TIMES

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOLUTIONS = sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))
TIMES = ROOT / "data" / "cache" / "notebook_times.json"
EXECUTED = ROOT / "data" / "cache" / "executed"
ALL = NOTEBOOKS + SOLUTIONS


def _id(p):
    return p.stem if p.parent.name == "notebooks" else f"solutions/{p.stem}"


@pytest.mark.parametrize("path", ALL, ids=[_id(p) for p in ALL])
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and not cell.get("execution_count"), f"{path.name} has outputs"


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("path", ALL, ids=[_id(p) for p in ALL])
def test_notebook_runs_in_fast_mode(path, request):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env_before = os.environ.get("DSV3LAB_FAST")
    os.environ["DSV3LAB_FAST"] = "1"
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        client = NotebookClient(
            nb, timeout=200, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
        )
        t0 = time.time()
        client.execute()
        elapsed = time.time() - t0
    finally:
        if env_before is None:
            os.environ.pop("DSV3LAB_FAST", None)
        else:
            os.environ["DSV3LAB_FAST"] = env_before
    EXECUTED.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, EXECUTED / path.relative_to(ROOT / "notebooks").as_posix().replace("/", "__"))
    times = json.loads(TIMES.read_text()) if TIMES.exists() else {}
    times[_id(path)] = round(elapsed, 1)
    TIMES.write_text(json.dumps(times, indent=2, sort_keys=True) + "\n")
    request.config.stash.setdefault(NOTEBOOK_TIMES, {})[_id(path)] = elapsed
