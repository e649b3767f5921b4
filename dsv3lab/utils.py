"""Small helpers shared by the library, the CLI and the notebooks: seeding, device choice, versions, fast mode."""

from __future__ import annotations

import os
import platform
import random

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(prefer: str | None = None) -> torch.device:
    """``prefer`` if given, else CUDA when available, else CPU. (MPS is opt-in: its numerics differ.)"""
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fast_mode() -> bool:
    """True when ``DSV3LAB_FAST=1``: notebooks and experiments shrink their work (tests set it)."""
    return os.environ.get("DSV3LAB_FAST", "0") not in ("", "0", "false", "False")


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("pandas", "matplotlib", "tokenizers", "safetensors", "transformers", "triton"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:
            out[name] = "-"
    from . import __version__

    out["dsv3lab"] = __version__
    return out


def setup_notebook(seed: int = 0, device: str | None = None, threads: int | None = None) -> torch.device:
    """The first cell of every notebook: print versions, seed everything, pick the device, and report fast mode."""
    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)
    dev = get_device(device)
    v = versions()
    print(" | ".join(f"{k} {val}" for k, val in v.items()))
    print(f"device: {dev} | seed: {seed} | fast mode: {fast_mode()} | threads: {torch.get_num_threads()}")
    return dev


def peak_step_memory(step, device: torch.device | str = "cpu") -> float:
    """Peak bytes allocated while ``step()`` runs, above the bytes live when it starts.

    On CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the start. On CPU: the allocation
    events of ``torch.profiler`` (``profile_memory=True``), summed in time order; unlike peak RSS this is free of the
    interpreter, imported libraries and allocator caching, so it measures the tensors of the step alone. Used by
    ``benchmarks/train_step.py`` and to check the planner (``dsv3lab.plan``) against what a step allocates.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - start)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if e.device_type() == DeviceType.CPU:  # allocations (+) and frees (-) on the CPU
            live += e.nbytes()
            peak = max(peak, live)
    return float(peak)


def time_alternating(fns: dict, repeats: int = 5, warmup: int = 1):
    """Time several callables side by side: ``warmup`` untimed calls each, then ``repeats`` rounds that call every
    function once in turn (A, B, A, B, …), so that load changes on a shared machine hit all of them alike.

    Returns a DataFrame with one row per function: ``name``, ``median_s``, ``min_s``, ``max_s`` (wall seconds per
    call) and ``repeats``.
    """
    import time

    import pandas as pd

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rows = [
        {"name": name, "median_s": float(np.median(ts)), "min_s": min(ts), "max_s": max(ts), "repeats": repeats}
        for name, ts in times.items()
    ]
    return pd.DataFrame(rows)
