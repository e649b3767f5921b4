"""Start ``world_size`` real processes, each in a ``torch.distributed`` process group, run one function on every rank
and return what each rank returned.

This is how dsv3lab's distributed tests, notebooks and experiments run several ranks on one machine without
``torchrun``: ``torch.multiprocessing`` (spawn) starts the processes and ``init_process_group`` joins them over TCP
on 127.0.0.1 (gloo on CPU; pass ``backend="nccl"`` on GPUs, one device per rank). Under ``torchrun`` the same rank
functions are called directly instead, after ``init_process_group`` reads the environment.

    def work(rank, world_size, x):
        t = torch.tensor([float(rank)]); dist.all_reduce(t); return t.item() * x
    spawn(work, 2, 10.0)   # -> [10.0, 10.0]

A rank that raises stops the whole group: the error is re-raised here with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the rendezvous of :func:`spawn`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankFailed(RuntimeError):
    """A rank of :func:`spawn` raised; the message holds that rank's traceback."""


def _entry(rank: int, fn: Callable, world_size: int, port: int, backend: str, threads: int, queue, args) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
    except BaseException:  # every failure goes back to the parent with its traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo", threads: int = 1, timeout: float = 300.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes joined in one process group.

    ``fn`` must be importable by name (a module-level function) and its arguments and return values picklable.
    ``threads``: torch CPU threads per rank (1 keeps several ranks from oversubscribing a small CPU).
    Returns the per-rank results in rank order.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (GPUs), got {backend!r}")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, fn, world_size, port, backend, threads, queue, args), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures: list[str] = []
    deadline = time.monotonic() + timeout
    while len(results) + len(failures) < world_size:
        if not queue.empty():
            rank, ok, value = queue.get()
            if ok:
                results[rank] = value
            else:
                failures.append(f"rank {rank}:\n{value}")
                break
        elif time.monotonic() > deadline:
            failures.append(f"timed out after {timeout:.0f} s with {len(results)}/{world_size} ranks done")
            break
        elif any(p.exitcode not in (None, 0) for p in procs) and queue.empty():
            dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            failures.append(f"rank(s) {dead} exited with codes {[procs[i].exitcode for i in dead]} and no result")
            break
        else:
            time.sleep(0.01)
    if failures:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
        raise RankFailed("a rank failed in spawn(" + getattr(fn, "__name__", "fn") + "):\n" + "\n".join(failures))
    for p in procs:
        p.join(timeout)
    return [results[r] for r in range(world_size)]
