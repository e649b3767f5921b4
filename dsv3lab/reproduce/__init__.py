"""``dsv3lab reproduce``: the registry of experiments that turn paper claims into figures, tables and a report.

Each experiment is a function ``run(ctx) -> Result`` registered with :func:`experiment`. It writes its CSV and PNG
files into ``ctx.out`` and returns a Markdown section (the paper's claim, what was measured, the verdict at this
scale) and a dict merged into ``summary.json``. Sections are kept in ``ctx.out/sections/`` so that ``--only NAME``
refreshes one experiment and REPORT.md is reassembled from all of them in registry order.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import torch

from ..files import atomic_write_text, read_json
from ..utils import versions


@dataclass
class Context:
    out: Path  # where CSV/PNG files go
    fast: bool  # --fast: one seed, fewer steps
    seeds: list[int]
    device: torch.device
    log: Callable[[str], None] = print


@dataclass
class Result:
    report: str  # Markdown section (starts with "## ")
    summary: dict[str, Any] = field(default_factory=dict)  # merged into summary.json at top level
    files: list[str] = field(default_factory=list)  # files written, relative to ctx.out


@dataclass
class Experiment:
    name: str
    title: str
    run: Callable[[Context], Result]


REGISTRY: dict[str, Experiment] = {}

# Experiment modules, in report order. Each registers itself on import.
EXPERIMENT_MODULES = ["tour", "load_balance", "specialization", "mtp", "fp8", "pipeline", "expert_parallel", "scale"]


def experiment(name: str, title: str) -> Callable[[Callable[[Context], Result]], Callable[[Context], Result]]:
    def wrap(fn: Callable[[Context], Result]) -> Callable[[Context], Result]:
        REGISTRY[name] = Experiment(name, title, fn)
        return fn

    return wrap


def load_registry() -> dict[str, Experiment]:
    """Every experiment, in report order (the order of :data:`EXPERIMENT_MODULES`, whichever was imported first)."""
    order = {f"{__name__}.{mod}": i for i, mod in enumerate(EXPERIMENT_MODULES)}
    for mod in EXPERIMENT_MODULES:
        importlib.import_module(f"{__name__}.{mod}")
    ranked = sorted(REGISTRY.values(), key=lambda e: order.get(e.run.__module__, len(order)))
    return {e.name: e for e in ranked}


def run(
    out: str | Path = "figures",
    fast: bool = False,
    only: list[str] | None = None,
    device: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the experiments (all, or ``only``), write their files, REPORT.md and summary.json; return the summary.

    Figures are drawn with matplotlib's non-interactive Agg backend, switched here and not when an experiment module
    is imported (a notebook importing an experiment keeps its own backend)."""
    matplotlib.use("Agg")
    registry = load_registry()
    names = only or list(registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; available: {', '.join(registry)}")
    out = Path(out)
    (out / "sections").mkdir(parents=True, exist_ok=True)
    seeds = [0] if fast else [0, 1, 2]
    dev = torch.device(device) if device else torch.device("cpu")
    ctx = Context(out=out, fast=fast, seeds=seeds, device=dev, log=log)
    summary_path = out / "summary.json"
    summary = {}
    if summary_path.exists():
        try:
            summary = read_json(summary_path, "the summary of earlier experiments")
        except ValueError as err:  # rebuilt from the experiments run now; sections of the others are kept
            warnings.warn(f"{summary_path} is unreadable ({err}); starting a new summary", stacklevel=2)
    timings = summary.setdefault("_meta", {}).setdefault("seconds", {})
    for name in names:
        exp = registry[name]
        log(f"[reproduce] {name}: {exp.title}")
        t0 = time.time()
        result = exp.run(ctx)
        timings[name] = round(time.time() - t0, 1)
        atomic_write_text(out / "sections" / f"{name}.md", result.report.rstrip() + "\n")
        summary.update(result.summary)
        log(f"[reproduce] {name} done in {timings[name]:.0f}s: {', '.join(result.files) or 'no files'}")
    summary["_meta"].update(
        fast=fast,
        seeds=seeds,
        versions=versions(),
        machine=machine_description(),
        command="dsv3lab reproduce" + (" --fast" if fast else ""),
        updated=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    atomic_write_text(summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out / "REPORT.md", assemble_report(out, registry, summary))
    return summary


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    threads = f"{os.cpu_count()} CPU threads visible, torch threads {torch.get_num_threads()}"
    return f"{platform.system()} {cpu}, {threads}, {gpu}"


def assemble_report(out: Path, registry: dict[str, Experiment], summary: dict[str, Any]) -> str:
    meta = summary.get("_meta", {})
    v = meta.get("versions", {})
    lines = [
        "# dsv3lab — reproduction report",
        "",
        "Every number and figure below was produced by `" + meta.get("command", "dsv3lab reproduce") + "` "
        f"(last run {meta.get('updated', '?')}; seeds {meta.get('seeds')}; {meta.get('machine', '')}; "
        f"torch {v.get('torch', '?')}, dsv3lab {v.get('dsv3lab', '?')}). "
        "Rerun it to regenerate them; nothing here is typed in by hand.",
        "",
    ]
    for name in registry:
        section = out / "sections" / f"{name}.md"
        if section.exists():
            secs = meta.get("seconds", {}).get(name)
            lines.append(section.read_text().rstrip())
            if secs is not None:
                lines += ["", f"*({name}: {secs:.0f} s)*"]
            lines.append("")
    return "\n".join(lines) + "\n"
