"""Training-step speed and memory: dsv3lab against transformers' ``DeepseekV3ForCausalLM``, side by side.

    python benchmarks/train_step.py [--preset toy] [--batch 8] [--seq-len 256] [--repeats 7] [--threads 2]

One forward + backward (next-token cross-entropy, gradients set to None between steps; no optimizer) of:

* ``dsv3lab[naive,loop]`` … ``dsv3lab[absorb,grouped]``: every combination of ``attn_impl`` and ``moe_impl``;
* ``transformers[sdpa,grouped_mm]``: transformers' default settings (``attn_implementation`` and
  ``experts_implementation`` left unset resolve to sdpa and grouped_mm in transformers 5.x);
* ``transformers[sdpa,eager]``: the same with its per-expert loop (``experts_implementation="eager"``).

All models hold the same weights (``dsv3lab.infer.hf.to_transformers``) and the same configuration. transformers has no
multi-token-prediction module, so the preset runs with ``n_mtp=0`` on both sides; the selection bias is set to small
random values so that it takes part in routing. Before timing, the logits of every variant are compared with
dsv3lab's reference path (``parity_max_abs_diff``).

Timing: after ``--warmup`` untimed steps per variant, ``--repeats`` rounds run every variant once per round in turn
(A/B/C/… alternation), so that load changes on a shared machine hit all variants alike. Reported: median, min and
max tokens/s over the rounds, and ratios of medians.

Memory: ``peak_mem_mb`` is the peak of tensor bytes allocated during one training step above what was live when
the step began (weights and inputs excluded, gradients freed before the step). On CPU it comes from the allocation
events of ``torch.profiler`` (``profile_memory=True``) in a separate, untimed step: unlike peak RSS it is free of the
interpreter, imported libraries and allocator caching, so it compares the models themselves. On CUDA it is
``torch.cuda.max_memory_allocated()`` minus the bytes allocated at the start of the step.

``cpu_s_per_step`` (median process CPU time of a step, all threads) is less sensitive than wall time to other jobs
on the machine, but counts threads that spin while they wait. Prints one JSON object on stdout. Numbers from a
machine that runs other jobs are noisy: compare the spread (min/max) and repeat the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

import dsv3lab
from dsv3lab.utils import peak_step_memory, versions

IMPLS = [("naive", "loop"), ("naive", "grouped"), ("absorb", "loop"), ("absorb", "grouped")]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_variants(
    cfg: dsv3lab.ModelConfig, device: torch.device, dtype: torch.dtype, with_transformers: bool, seed: int
) -> dict[str, torch.nn.Module]:
    base = dsv3lab.build_model(cfg, device=device, dtype=dtype, seed=seed)
    with torch.no_grad():  # a non-zero selection bias, so that it takes part in routing on both sides
        g = torch.Generator().manual_seed(seed + 1)
        for moe in base.moe_layers():
            moe.gate.bias.copy_(torch.randn(moe.gate.bias.shape, generator=g) * 0.01)
    models: dict[str, torch.nn.Module] = {}
    for attn_impl, moe_impl in IMPLS:
        if moe_impl == "grouped" and not dsv3lab.model.moe.grouped_mm_supported(device, dtype):
            continue
        m = dsv3lab.build_model(cfg.replace(attn_impl=attn_impl, moe_impl=moe_impl), device=device, dtype=dtype)
        m.load_state_dict(base.state_dict())
        models[f"dsv3lab[{attn_impl},{moe_impl}]"] = m
    if with_transformers:
        from dsv3lab.infer.hf import to_transformers

        hf = to_transformers(base)  # transformers' defaults: sdpa attention, grouped_mm experts
        models[f"transformers[{hf.config._attn_implementation},{hf.config._experts_implementation}]"] = hf
        hf_eager = to_transformers(base)
        hf_eager.set_experts_implementation("eager")
        models[f"transformers[{hf_eager.config._attn_implementation},eager]"] = hf_eager
    for m in models.values():
        m.train()
    return models


def step_fn(name: str, model: torch.nn.Module, tokens: torch.Tensor) -> Callable[[], float]:
    """One training step (forward, loss, backward); returns the loss."""
    targets = tokens.roll(-1, dims=1)
    targets[:, -1] = dsv3lab.model.IGNORE_INDEX

    if name.startswith("dsv3lab"):

        def step() -> float:
            losses = model(tokens, targets)[1]  # like transformers' `.loss` below: the logits are not kept
            losses["total"].backward()
            model.zero_grad(set_to_none=True)
            return losses["total"].item()

    else:

        def step() -> float:
            loss = model(input_ids=tokens, labels=tokens).loss  # transformers shifts the labels itself
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss.item()

    return step


def logits_of(name: str, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)[0] if name.startswith("dsv3lab") else model(input_ids=tokens).logits


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_step(step: Callable[[], float]) -> dict:
    """FLOPs of one dsv3lab training step (forward + backward) from ``torch.utils.flop_counter``, and the shares of
    the output head, the attention layers and the FFN layers (dense MLP and MoE)."""
    import re

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    total = per_module["Global"]
    head = per_module.get("DeepSeekV3.head", 0)
    attn = sum(v for k, v in per_module.items() if re.fullmatch(r"DeepSeekV3\.layers\.\d+\.attn", k))
    ffn = sum(v for k, v in per_module.items() if re.fullmatch(r"DeepSeekV3\.layers\.\d+\.ffn", k))
    return {
        "total_gflop": round(total / 1e9, 3),
        "share": {
            "output head": round(head / total, 3),
            "attention (MLA)": round(attn / total, 3),
            "FFN (dense MLP + MoE)": round(ffn / total, 3),
            "other": round((total - head - attn - ffn) / total, 3),
        },
    }


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = dsv3lab.ModelConfig.preset(args.preset, n_mtp=0)
    if args.seq_len > cfg.max_seq_len:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds the preset's max_seq_len {cfg.max_seq_len}")
    with_hf = not args.no_transformers
    if with_hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers is not installed: comparing dsv3lab variants only", file=sys.stderr)
            with_hf = False
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    models = build_variants(cfg, device, dtype, with_hf, args.seed)
    if args.compile:  # the reference path under torch.compile, sharing its weights (compilation is in the warm-up)
        models["dsv3lab[naive,loop]+compile"] = torch.compile(models["dsv3lab[naive,loop]"])
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=g).to(device)
    tokens_per_step = args.batch * args.seq_len

    # 1) the same function: logits of every variant against dsv3lab's reference path
    ref_name = "dsv3lab[naive,loop]"
    ref = logits_of(ref_name, models[ref_name], tokens)
    parity = {name: float((logits_of(name, m, tokens) - ref).abs().max()) for name, m in models.items()}

    steps = {name: step_fn(name, m, tokens) for name, m in models.items()}
    flops = flops_per_step(steps[ref_name])  # the same matrix products run in every variant
    # 2) peak memory, each in its own untimed step
    memory = {name: peak_step_memory(step, device) / 2**20 for name, step in steps.items()}
    # 3) warm-up, then alternate the variants round by round
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_times: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, step in steps.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            losses[name] = step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)

    results = {}
    for name, ts in times.items():
        tps = [tokens_per_step / t for t in ts]
        results[name] = {
            "tokens_per_s": round(statistics.median(tps), 1),
            "tokens_per_s_min": round(min(tps), 1),
            "tokens_per_s_max": round(max(tps), 1),
            "step_s": [round(t, 4) for t in ts],
            "cpu_s_per_step": round(statistics.median(cpu_times[name]), 4),
            "peak_mem_mb": round(memory[name], 1),
            "loss": round(losses[name], 5),
            "parity_max_abs_diff": parity[name],
        }

    def ratio(a: str, b: str, cpu: bool = False) -> float | None:
        """Speed of a over speed of b: tokens/s medians, or (cpu=True) the inverse ratio of CPU seconds per step."""
        if a in results and b in results:
            if cpu:
                return round(results[b]["cpu_s_per_step"] / results[a]["cpu_s_per_step"], 3)
            return round(results[a]["tokens_per_s"] / results[b]["tokens_per_s"], 3)
        return None

    hf_default = next((n for n in results if n.startswith("transformers") and not n.endswith(",eager]")), None)
    hf_eager = next((n for n in results if n.startswith("transformers") and n.endswith(",eager]")), None)
    ds = {n: r for n, r in results.items() if n.startswith("dsv3lab")}
    ds_best = max(ds, key=lambda n: ds[n]["tokens_per_s"])
    pairs = {
        "naive_grouped_vs_naive_loop": ("dsv3lab[naive,grouped]", "dsv3lab[naive,loop]"),
        "absorb_grouped_vs_absorb_loop": ("dsv3lab[absorb,grouped]", "dsv3lab[absorb,loop]"),
        "naive_loop_vs_absorb_loop": ("dsv3lab[naive,loop]", "dsv3lab[absorb,loop]"),
        "naive_grouped_vs_absorb_grouped": ("dsv3lab[naive,grouped]", "dsv3lab[absorb,grouped]"),
    }
    if hf_default:
        pairs.update(
            {
                "dsv3lab[naive,grouped]_vs_transformers_default": ("dsv3lab[naive,grouped]", hf_default),
                "dsv3lab[naive,loop]_vs_transformers_eager": ("dsv3lab[naive,loop]", hf_eager),
                "dsv3lab_best_vs_transformers_default": (ds_best, hf_default),
            }
        )
    ratios = {name: ratio(a, b) for name, (a, b) in pairs.items()}
    ratios_cpu = {name: ratio(a, b, cpu=True) for name, (a, b) in pairs.items()}
    return {
        "benchmark": "train_step",
        "command": "python benchmarks/train_step.py " + " ".join(sys.argv[1:]),
        "what": "forward + backward of next-token cross-entropy; tokens/s = batch * seq_len / step time",
        "preset": args.preset,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "dtype": args.dtype,
        "tokens_per_step": tokens_per_step,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "note": "transformers has no MTP module: both sides run the preset with n_mtp=0",
        "transformers_settings": {
            "default": hf_default,
            "eager_experts": hf_eager,
            "note": "transformers 5.x resolves unset attn_implementation to sdpa and experts_implementation to "
            "grouped_mm (sort by expert + torch grouped GEMM); eager is its per-expert loop",
        }
        if with_hf
        else None,
        "fastest_dsv3lab": ds_best,
        "flops_per_step": dict(flops, note=f"torch.utils.flop_counter on one {ref_name} step (forward + backward)"),
        "results": results,
        "ratios": ratios,
        "ratios_by_cpu_time": ratios_cpu,
        "memory_method": (
            "torch.profiler allocation events: peak tensor bytes during one step above the bytes live at its start"
            if device.type == "cpu"
            else "torch.cuda.max_memory_allocated - memory_allocated at the start of the step"
        ),
        "machine": {
            "device": str(device),
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "versions": versions(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="toy", help="a dsv3lab preset (default toy)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (each runs every variant once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-transformers", action="store_true", help="compare dsv3lab variants only")
    p.add_argument("--compile", action="store_true", help="also time dsv3lab[naive,loop] under torch.compile")
    args = p.parse_args(argv)
    print(json.dumps(run(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
