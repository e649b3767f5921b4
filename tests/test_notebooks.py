"""Every notebook (and every solution notebook) runs top to bottom in a fresh kernel in fast mode, shows no error
output and no overlapping labels, and is committed without outputs.

The executed copies (figures and widget state included) are kept under data/cache/notebooks/fast/, where the site
check (tests/test_site.py) renders them instead of executing every notebook a second time. The fast-mode limit
(DESIGN.md: <= 60 s per notebook on a 2-core CPU) is measured and reported at the end of the session (and in
data/cache/notebook_times.json), not asserted: a shared machine's speed varies. nbclient's per-cell timeout and
pytest-timeout guard against a hang.
"""

import json
from pathlib import Path

import pytest

from docs.notebooks import NOTEBOOKS as NOTEBOOK_DIR
from docs.notebooks import execute, notebook_paths, problems
from helpers import NOTEBOOK_TIMES

ROOT = Path(__file__).parent.parent
TIMES = ROOT / "data" / "cache" / "notebook_times.json"
ALL = notebook_paths()


def _id(p):
    return p.relative_to(NOTEBOOK_DIR).with_suffix("").as_posix()


@pytest.mark.parametrize("path", ALL, ids=[_id(p) for p in ALL])
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and not cell.get("execution_count"), f"{path.name} has outputs"


MAIN = [p for p in ALL if p.parent == NOTEBOOK_DIR]


@pytest.mark.parametrize("path", MAIN, ids=[_id(p) for p in MAIN])
def test_course_scaffolding(path):
    """Every notebook of the series: a header (paper sections, prerequisites, time on a 2-core CPU), "Try this"
    exercises with a solutions notebook that exists, a summary, and a link to the next notebook (the last one links
    back to the tour)."""
    nb = json.loads(path.read_text())
    header = "".join(nb["cells"][0]["source"]).lower()
    for word in ("paper", "prerequisites", "time"):
        assert word in header, f"{path.name}: the header cell does not state the {word}"
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "Try this" in text, f"{path.name}: no exercises"
    solutions = f"solutions/{path.stem}_solutions.ipynb"
    assert solutions in text and (NOTEBOOK_DIR / solutions).exists(), f"{path.name}: no link to {solutions}"
    assert "Summary" in text or "summary" in text, f"{path.name}: no summary"
    later = [p.name for p in MAIN if p.name > path.name]
    target = later[0] if later else MAIN[0].name
    assert f"]({target})" in text, f"{path.name}: no link to {target}"


@pytest.mark.parametrize("path", ALL, ids=[_id(p) for p in ALL])
def test_no_tag_in_multiline_display_math(path):
    """Sphinx wraps display math holding a line break (\\\\) in a split environment, where MathJax refuses \\tag:
    the site then shows a red error box (tests/test_site.py catches it only with a browser). Number those by hand."""
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            for block in "".join(cell["source"]).split("$$")[1::2]:
                assert not ("\\\\" in block and "\\tag" in block), f"{path.name}: \\tag in {block[:60]!r}"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", ALL, ids=[_id(p) for p in ALL])
def test_notebook_runs_in_fast_mode(path, request):
    nb, elapsed = execute(path, "fast", timeout=240)
    assert not problems(nb), f"{path.name}: " + "; ".join(problems(nb))  # errors, overlapping labels
    TIMES.parent.mkdir(parents=True, exist_ok=True)
    times = json.loads(TIMES.read_text()) if TIMES.exists() else {}
    times[_id(path)] = round(elapsed, 1)
    TIMES.write_text(json.dumps(times, indent=2, sort_keys=True) + "\n")
    request.config.stash.setdefault(NOTEBOOK_TIMES, {})[_id(path)] = elapsed
