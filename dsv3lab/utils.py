"""Small helpers shared by the library, the CLI and the notebooks: seeding, device choice, versions, fast mode."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import time

import numpy as np
import pandas as pd
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from .version import __version__


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(prefer: str | None = None) -> torch.device:
    """``prefer`` if given (checked: :func:`check_device`), else CUDA when available, else CPU. (MPS is opt-in: its
    numerics differ.)"""
    if prefer:
        return check_device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(name: str | torch.device) -> torch.device:
    """A device that exists on this machine, or a ``ValueError`` saying which ones do."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {name!r} is not a device name ({err}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device {name!r}: no CUDA device is available on this machine; use cpu")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {name!r}: this machine has {n} CUDA device(s), cuda:0 … cuda:{n - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available on this machine; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    return dev


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("", "0", "false", "no", "off")


def env_flag(name: str, default: bool = False) -> bool:
    """A boolean environment switch, parsed strictly: 1/true/yes/on, or 0/false/no/off/empty (any case); anything
    else is a ``ValueError`` naming the variable (a typo must not silently mean "off")."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"environment variable {name}={raw!r} is not a switch; use one of {TRUE_WORDS + FALSE_WORDS[1:]}")


def fast_mode() -> bool:
    """True when ``DSV3LAB_FAST=1``: notebooks and experiments shrink their work (tests set it)."""
    return env_flag("DSV3LAB_FAST")


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("pandas", "matplotlib", "tokenizers", "safetensors", "transformers", "triton"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:
            out[name] = "-"
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


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block on ``n`` torch CPU threads, restoring the previous count afterwards. Toy-sized GEMMs gain little
    from a second thread, pay for the hand-offs on a shared machine, and give the same numbers on one thread
    whatever the machine's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def parse_size(size: int | str) -> int:
    """``5GB`` / ``200KB`` / ``1.5MB`` / ``80GiB`` / an int (bytes) -> bytes (KB, MB, GB decimal as transformers;
    KiB, MiB, GiB binary). A size must be a finite number of bytes > 0."""
    units = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1))
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"a size must be bytes or a string such as '5GB', got {size!r}")
    text = str(size).strip().upper()
    number, mult = text, 1
    for unit, m in units:
        if text.endswith(unit):
            number, mult = text[: -len(unit)], m
            break
    try:
        value = float(number) * mult
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"cannot read the size {size!r}; use bytes > 0 or a number with KB, MB, GB (or KiB, MiB, GiB)")
    return int(value)
