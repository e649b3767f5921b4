"""The house's layers point down (DESIGN.md, README "Where each concept lives"): an AST check of every import in
dsv3lab/, module level and inside functions alike.

    cli, __main__, __init__                      the command line and the package's front door
    reproduce, viz                               experiments and pictures (reproduce may use viz)
    infer → train → parallel                     running the model: serving, one or many processes (sideways only
                                                 in that direction)
    model                                        the network
    fp8, data                                    numerics and data, no model imports
    config, accounting, balance, utils, files, version,  plain data and arithmetic
    activations, plan

A lazy import (inside a function) is allowed only for an optional heavy dependency, listed in LAZY_ALLOWED with
the reason; everything else is imported at the top of its module.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dsv3lab"

RANK = {
    "config": 0,
    "accounting": 0,
    "balance": 0,
    "utils": 0,
    "files": 0,
    "version": 0,
    "activations": 0,
    "plan": 0,
    "fp8": 1,
    "data": 1,
    "model": 2,
    "parallel": 3,
    "train": 3,
    "infer": 3,
    "reproduce": 4,
    "viz": 4,
    "cli": 5,
    "__main__": 5,
    "__init__": 5,
}
# imports between units of the same rank: (from, to) pairs that are allowed; anything else sideways is an error
SIDEWAYS = {("train", "parallel"), ("infer", "train"), ("infer", "parallel"), ("reproduce", "viz")}
# single modules allowed to import a unit of their rank that their unit may not: (module, unit) -> why
MODULE_SIDEWAYS = {
    ("dsv3lab.train.grpo", "infer"): "GRPO samples its rollouts with the one generation API (infer.generate); "
    "dsv3lab/train/__init__ does not import grpo, so infer -> train stays free of cycles (test below)"
}
# the bottom layer's modules may use each other only in this order (no cycles): files, version < utils < config <
# accounting, balance < activations < plan
BOTTOM_ORDER = {
    "files": 0,
    "version": 0,
    "utils": 1,
    "config": 2,
    "accounting": 3,
    "balance": 3,
    "activations": 4,
    "plan": 5,
}

LAZY_ALLOWED = {
    "triton": "Triton is an optional extra and only needed for the CUDA kernels",
    "dsv3lab.fp8.kernels": "imports triton (above); reached only when a kernel GEMM runs",
    "transformers": "the optional `hf` extra, the reference for parity tests and benchmarks",
    "datasets": "optional: a user corpus saved with datasets.save_to_disk",
    "ipywidgets": "widgets are built only inside a notebook",
    "IPython": "display() exists only inside a notebook",
    "dsv3lab.parallel.pipeline": "imports torch.distributed.pipelining (seconds): the CLI needs it for --execute only",
    "torch.distributed.pipelining": "seconds to import, and it imports triton: only a pipelined run (pp > 1) needs it",
    "torch._inductor": "imports Dynamo and triton (seconds): only a run with compile=true configures it",
    "torch._functorch": "loaded with inductor (above), for the same compiled runs only",
}


def unit(module: str) -> str:
    """The layer unit of a dsv3lab module name: its sub-package or top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path):
    """(target module, lineno, is_lazy) for every import in a file; relative imports resolved."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    here = list(rel.parts)
    if here[-1] == "__init__":
        here = here[:-1]
        package = here
    else:
        package = here[:-1]
    tree = ast.parse(path.read_text())
    lazy_nodes = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
        if isinstance(n, (ast.Import, ast.ImportFrom))
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, id(node) in lazy_nodes
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from . import x, y
                    for a in node.names:
                        yield f"{target}.{a.name}", node.lineno, id(node) in lazy_nodes
                    continue
            else:
                target = node.module
            yield target, node.lineno, id(node) in lazy_nodes


FILES = sorted(PKG.rglob("*.py"))


def violations(path: Path) -> list[str]:
    me = ".".join(path.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
    mine = unit(me)
    out = []
    for target, line, lazy in imports(path):
        where = f"{path.relative_to(PKG.parent)}:{line}"
        if lazy and not any(target == a or target.startswith(a + ".") for a in LAZY_ALLOWED):
            out.append(f"{where}: lazy import of {target} (import it at the top of the module)")
        if not target.startswith("dsv3lab"):
            continue
        theirs = unit(target)
        if theirs == mine:
            continue
        a, b = RANK[mine], RANK[theirs]
        if b > a:
            out.append(f"{where}: {mine} (layer {a}) imports {target} (layer {b}): an upward import")
        elif (
            b == a
            and (mine, theirs) not in SIDEWAYS
            and (me, theirs) not in MODULE_SIDEWAYS
            and a not in (0, RANK["cli"])
        ):
            out.append(f"{where}: {mine} imports {target} sideways; allowed sideways: {sorted(SIDEWAYS)}")
        elif a == b == 0 and BOTTOM_ORDER[theirs] >= BOTTOM_ORDER[mine]:
            out.append(f"{where}: {mine} imports {target}: the bottom layer's order is {BOTTOM_ORDER}")
    return out


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PKG)) for p in FILES])
def test_imports_point_down(path):
    assert violations(path) == []


def test_the_check_catches_upward_sideways_and_lazy_imports(tmp_path, monkeypatch):
    """The rule can fail: a model module importing infer, a parallel module importing train, and a lazy import of
    a hard dependency are each reported."""
    fake = tmp_path / "dsv3lab"
    (fake / "model").mkdir(parents=True)
    (fake / "parallel").mkdir()
    (fake / "model" / "bad.py").write_text("from ..infer import generate\n")
    (fake / "parallel" / "bad.py").write_text("from ..train import train\n")
    (fake / "utils.py").write_text("def f():\n    import pandas\n    from . import config\n")
    monkeypatch.setattr(__import__(__name__), "PKG", fake)
    assert "upward import" in violations(fake / "model" / "bad.py")[0]
    assert "sideways" in violations(fake / "parallel" / "bad.py")[0]
    found = violations(fake / "utils.py")
    assert any("lazy import of pandas" in v for v in found) and any("bottom layer's order" in v for v in found)


def test_train_does_not_import_grpo():
    """The one train -> infer import (train.grpo, MODULE_SIDEWAYS) is not part of importing dsv3lab.train, which
    infer imports to read run folders: in a fresh interpreter dsv3lab.train loads without train.grpo, and then
    train.grpo imports cleanly."""
    import subprocess
    import sys

    code = "import sys, dsv3lab.train; assert 'dsv3lab.train.grpo' not in sys.modules; import dsv3lab.train.grpo"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert run.returncode == 0, run.stderr
