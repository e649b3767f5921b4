"""Training-step speed and memory: dsv3lab against transformers' ``DeepseekV3ForCausalLM``, side by side.

    python benchmarks/train_step.py [--preset toy] [--batch 8] [--seq-len 256] [--repeats 7] [--threads 2]
        [--dtype float32|bfloat16|bf16-autocast[,...]] [--profile] [--compile] [--figure PNG] [--markdown]
    python benchmarks/train_step.py --from-json SAVED.json [--figure PNG] [--markdown]   # redraw / tabulate

One forward + backward (next-token cross-entropy, gradients set to None between steps; no optimizer) of:

* ``dsv3lab[naive,loop]`` … ``dsv3lab[absorb,grouped]``: every combination of ``attn_impl`` and ``moe_impl``;
* ``dsv3lab[naive,grouped]+fused_loss``: the trainer's fast path, the output head and cross-entropy fused and chunked
  (``dsv3lab.model.loss.linear_cross_entropy``: no full logits); with ``--compile`` also the same under
  ``torch.compile`` (``+compile``; ``dsv3lab.train.compile``), its compilation timed separately (``compile``);
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

dtype: ``float32``; ``bfloat16`` (weights converted to bf16); ``bf16-autocast`` (the paper's recipe and the
trainer's ``dtype=bf16``: FP32 master weights, every step under ``torch.autocast(bfloat16)``, both libraries). A
comma-separated list runs each in turn and prints ``{"runs": {dtype: report}}``.

Roofline (``roofline``): the step's FLOPs (``torch.utils.flop_counter``, forward + backward) over its median time
give each variant's achieved GFLOP/s, set against the rate of a 2048² ``torch.mm`` in fp32 and in bf16 timed
in the same rounds as the steps (``matmul_gflops``), so that machine load hits both alike.

Profile (``--profile``): the top operators by self CPU time of the reference, of the fastest dsv3lab variant and of
transformers' default (``torch.profiler``; per operator the median over ``--profile-steps`` profiled steps, default
5), in ``profile``.

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
from pathlib import Path

import torch

import dsv3lab
from dsv3lab.train.compile import CompiledModel, compile_model
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
    fast = "dsv3lab[naive,grouped]" if "dsv3lab[naive,grouped]" in models else "dsv3lab[naive,loop]"
    models[f"{fast}+fused_loss"] = models[fast]  # the same model; its step uses fused_loss=True
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


def step_fn(name: str, model, tokens: torch.Tensor, autocast: bool) -> Callable[[], float]:
    """One training step (forward, loss, backward); returns the loss. ``model``: the module, or a
    :class:`~dsv3lab.train.compile.CompiledModel` of it."""
    targets = tokens.roll(-1, dims=1)
    targets[:, -1] = dsv3lab.model.IGNORE_INDEX
    module = model.model if isinstance(model, CompiledModel) else model
    fused = "+fused_loss" in name

    def context():
        return torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=autocast)

    if name.startswith("dsv3lab"):

        def step() -> float:
            with context():  # like transformers' `.loss` below: the logits are not kept
                losses = model(tokens, targets, check=False, fused_loss=fused)[1]
            losses["total"].backward()
            module.zero_grad(set_to_none=True)
            return losses["total"].item()

    else:

        def step() -> float:
            with context():
                loss = model(input_ids=tokens, labels=tokens).loss  # transformers shifts the labels itself
            loss.backward()
            module.zero_grad(set_to_none=True)
            return loss.item()

    return step


def logits_of(name: str, model: torch.nn.Module, tokens: torch.Tensor, autocast: bool) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(tokens)[0] if name.startswith("dsv3lab") else model(input_ids=tokens).logits
    return out.float()


def matmul_fn(n: int, dtype: torch.dtype, device: torch.device, calls: int = 3) -> Callable[[], float]:
    """``calls`` products of two n×n matrices in ``dtype``; returns the wall seconds of one."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)

    def run() -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b)
        sync(device)
        return (time.perf_counter() - t0) / calls

    return run


def top_operators(step: Callable[[], float], top: int, steps: int = 5) -> list[dict]:
    """The ``top`` operators by self CPU time (``torch.profiler``), each profiled step on its own: per operator the
    median over ``steps`` steps of its self CPU ms, share of the step's total and calls (a median, so that one step
    stalled by another job on the machine does not decide the table)."""
    from torch.profiler import ProfilerActivity, profile

    per_op: dict[str, list[tuple[float, float, int]]] = {}
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = list(prof.key_averages())
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        for e in events:
            per_op.setdefault(e.key, []).append((e.self_cpu_time_total / 1e3, e.self_cpu_time_total / total, e.count))
    rows = []
    for op, values in per_op.items():
        values += [(0.0, 0.0, 0)] * (steps - len(values))  # absent from a step: 0 there
        rows.append(
            {
                "op": op,
                "self_cpu_ms": round(statistics.median(v[0] for v in values), 2),
                "share": round(statistics.median(v[1] for v in values), 3),
                "calls": int(statistics.median(v[2] for v in values)),
            }
        )
    rows.sort(key=lambda r: r["self_cpu_ms"], reverse=True)
    return rows[:top]


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


def run(args: argparse.Namespace, dtype_name: str) -> dict:
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
    autocast = dtype_name == "bf16-autocast"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16-autocast": torch.float32}[dtype_name]
    models = build_variants(cfg, device, dtype, with_hf, args.seed)
    fast_name = next(n for n in models if n.endswith("+fused_loss"))
    compiled = None
    if args.compile:  # the fast path under torch.compile, sharing its weights
        torch._dynamo.reset()
        compiled = compile_model(models[fast_name])
        models[f"{fast_name}+compile"] = compiled
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=g).to(device)
    tokens_per_step = args.batch * args.seq_len

    # 1) the same function: logits of every variant against dsv3lab's reference path (bf16 tolerance in bf16)
    ref_name = "dsv3lab[naive,loop]"
    ref = logits_of(ref_name, models[ref_name], tokens, autocast)
    modules = {name: m.model if isinstance(m, CompiledModel) else m for name, m in models.items()}
    parity = {name: float((logits_of(name, m, tokens, autocast) - ref).abs().max()) for name, m in modules.items()}
    steps = {name: step_fn(name, m, tokens, autocast) for name, m in models.items()}
    compile_info = None
    if compiled is not None:  # compile first (the first call), timed on its own
        t0 = time.perf_counter()
        steps[f"{fast_name}+compile"]()
        first_call_s = time.perf_counter() - t0
        compile_info = {"first_call_s": round(first_call_s, 2), "compiled": compiled.is_compiled}
        compile_info["fallback_reason"] = compiled.fallback_reason
    flops = flops_per_step(steps[ref_name])  # the same matrix products run in every variant
    # 2) peak memory, each in its own untimed step
    memory = {name: peak_step_memory(step, device) / 2**20 for name, step in steps.items()}
    # 3) warm-up, then alternate the variants (and the matmul probes) round by round
    matmuls = {
        "float32": matmul_fn(args.matmul_size, torch.float32, device),
        "bfloat16": matmul_fn(args.matmul_size, torch.bfloat16, device),
    }
    for fn in list(steps.values()) + list(matmuls.values()):
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_times: dict[str, list[float]] = {name: [] for name in steps}
    mm_times: dict[str, list[float]] = {name: [] for name in matmuls}
    losses: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, step in steps.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            losses[name] = step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
        for name, fn in matmuls.items():
            mm_times[name].append(fn())
    mm_flop = 2 * args.matmul_size**3
    matmul_gflops = {name: round(mm_flop / statistics.median(ts) / 1e9, 1) for name, ts in mm_times.items()}

    results = {}
    step_gflop = flops["total_gflop"]
    for name, ts in times.items():
        tps = [tokens_per_step / t for t in ts]
        achieved = step_gflop / statistics.median(ts)
        results[name] = {
            "tokens_per_s": round(statistics.median(tps), 1),
            "tokens_per_s_min": round(min(tps), 1),
            "tokens_per_s_max": round(max(tps), 1),
            "step_s": [round(t, 4) for t in ts],
            "cpu_s_per_step": round(statistics.median(cpu_times[name]), 4),
            "peak_mem_mb": round(memory[name], 1),
            "loss": round(losses[name], 5),
            "parity_max_abs_diff": parity[name],
            "achieved_gflops": round(achieved, 1),
            "fraction_of_fp32_matmul": round(achieved / matmul_gflops["float32"], 3),
            "fraction_of_bf16_matmul": round(achieved / matmul_gflops["bfloat16"], 3),
        }
    if compile_info is not None:
        name = f"{fast_name}+compile"
        compile_info["compile_s"] = round(compile_info["first_call_s"] - statistics.median(times[name]), 2)
        compile_info["note"] = (
            "first call minus the median step: Dynamo tracing + Inductor code generation, or loading the generated "
            "code from the on-disk cache (dsv3lab.train.compile, data/cache/inductor) when an earlier run compiled "
            "the same graphs"
        )

    def ratio(a: str, b: str, cpu: bool = False) -> float | None:
        """Speed of a over speed of b: tokens/s medians, or (cpu=True) the inverse ratio of CPU seconds per step."""
        if a in results and b in results:
            if cpu:
                return round(results[b]["cpu_s_per_step"] / results[a]["cpu_s_per_step"], 3)
            return round(results[a]["tokens_per_s"] / results[b]["tokens_per_s"], 3)
        return None

    hf_default = next((n for n in results if n.startswith("transformers") and not n.endswith(",eager]")), None)
    hf_eager = next((n for n in results if n.startswith("transformers") and n.endswith(",eager]")), None)
    if compile_info is not None and not compile_info["compiled"]:  # it ran eager: timed, but no speed claim
        results[f"{fast_name}+compile"]["note"] = "compilation failed: this ran eager (see compile.fallback_reason)"
    ds = {n: r for n, r in results.items() if n.startswith("dsv3lab") and "note" not in r}
    ds_best = max(ds, key=lambda n: ds[n]["tokens_per_s"])
    pairs = {
        "naive_grouped_vs_naive_loop": ("dsv3lab[naive,grouped]", "dsv3lab[naive,loop]"),
        "absorb_grouped_vs_absorb_loop": ("dsv3lab[absorb,grouped]", "dsv3lab[absorb,loop]"),
        "naive_loop_vs_absorb_loop": ("dsv3lab[naive,loop]", "dsv3lab[absorb,loop]"),
        "naive_grouped_vs_absorb_grouped": ("dsv3lab[naive,grouped]", "dsv3lab[absorb,grouped]"),
        "fused_loss_vs_naive_grouped": (fast_name, "dsv3lab[naive,grouped]"),
        "fast_vs_reference": (fast_name, ref_name),
        "best_vs_reference": (ds_best, ref_name),
    }
    if compiled is not None and compiled.is_compiled:
        pairs["compile_vs_fused_loss"] = (f"{fast_name}+compile", fast_name)
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
    profile = None
    if args.profile:
        chosen = [ref_name, ds_best] + ([hf_default] if hf_default else [])
        profile = {
            name: top_operators(steps[name], args.profile_top, args.profile_steps) for name in dict.fromkeys(chosen)
        }
    return {
        "benchmark": "train_step",
        "command": "python benchmarks/train_step.py " + " ".join(sys.argv[1:]),
        "what": "forward + backward of next-token cross-entropy; tokens/s = batch * seq_len / step time",
        "preset": args.preset,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "dtype": dtype_name,
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
        "roofline": {
            "step_gflop": step_gflop,
            "matmul_gflops": matmul_gflops,
            "matmul": f"torch.mm of two {args.matmul_size}x{args.matmul_size} matrices, median over the rounds",
            "achieved_gflops": {n: r["achieved_gflops"] for n, r in results.items()},
            "fraction_of_bf16_matmul": {n: r["fraction_of_bf16_matmul"] for n, r in results.items()},
            "fraction_of_fp32_matmul": {n: r["fraction_of_fp32_matmul"] for n, r in results.items()},
        },
        "compile": compile_info,
        "results": results,
        "ratios": ratios,
        "ratios_by_cpu_time": ratios_cpu,
        "profile": profile,
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


def draw_roofline(reports: dict[str, dict], path: str) -> None:
    """Achieved GFLOP/s of every variant (bars, one group per dtype) against the fp32 and bf16 matmul rates measured
    in the same run (lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        (dt, name + (" (ran eager)" if "note" in r else ""), r["achieved_gflops"])
        for dt, rep in reports.items()
        for name, r in rep["results"].items()
    ]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 2), 4.8))
    colors = {"dsv3lab": "tab:blue", "transformers": "tab:orange"}
    xs = list(range(len(rows)))
    bar_colors = [colors[n.split("[")[0]] if "eager)" not in n else "tab:gray" for _, n, _ in rows]
    bars = ax.bar(xs, [v for _, _, v in rows], color=bar_colors)
    for bar, (_, _, v) in zip(bars, rows):
        ax.annotate(f"{v:.0f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{n}\n{dt}" for dt, n, _ in rows], rotation=75, ha="right", fontsize=7)
    styles = {"float32": ("k", "--"), "bfloat16": ("tab:red", ":")}
    for i, (dt, rep) in enumerate(reports.items()):
        for mm, rate in rep["roofline"]["matmul_gflops"].items():
            color, ls = styles[mm]
            label = f"{mm} {rep['roofline']['matmul'].split(' of ')[1].split(',')[0]}: {rate:.0f} GFLOP/s ({dt} run)"
            ax.axhline(rate, color=color, linestyle=ls, alpha=1.0 - 0.4 * i, label=label)
    first = next(iter(reports.values()))
    ax.set_ylabel("GFLOP/s (step FLOPs / median step time, log scale)")
    ax.set_title(
        f"{first['preset']} preset, batch {first['batch']}x{first['seq_len']}, "
        f"{first['machine']['torch_threads']} threads: achieved vs matmul rate",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="center left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


DTYPES = ("float32", "bfloat16", "bf16-autocast")


def markdown(out: dict) -> str:
    """The README's tables from this script's JSON: per dtype, every variant's speed, roofline fractions, memory
    and parity; the compile cost; the profile's top operators of the reference and of the fastest variant."""
    reports = out["runs"] if "runs" in out else {out["dtype"]: out}
    lines = []
    for dt, rep in reports.items():
        roof = rep["roofline"]
        mm = roof["matmul_gflops"]
        lines += [
            f"**{dt}** — step {roof['step_gflop']} GFLOP; 2048² matmul in the same rounds: fp32 {mm['float32']:,.0f}, "
            f"bf16 {mm['bfloat16']:,.0f} GFLOP/s",
            "",
            "| variant | tokens/s, median [min–max] | GFLOP/s | of fp32 mm | of bf16 mm | peak MiB "
            "| max abs logit diff |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in rep["results"].items():
            label = f"`{name}`" + (" (ran eager: compilation failed)" if "note" in r else "")
            lines.append(
                f"| {label} | {r['tokens_per_s']:,.0f} [{r['tokens_per_s_min']:,.0f}–{r['tokens_per_s_max']:,.0f}] "
                f"| {r['achieved_gflops']:.0f} | {r['fraction_of_fp32_matmul']:.0%} | "
                f"{r['fraction_of_bf16_matmul']:.1%} | {r['peak_mem_mb']:.0f} | {r['parity_max_abs_diff']:.1e} |"
            )
        ratios = rep["ratios"]
        keys = [k for k in ratios if "vs_transformers" in k or k.startswith(("fast_", "best_", "compile_", "fused_"))]
        lines += ["", "Ratios of medians: " + "; ".join(f"{k} **{ratios[k]}**" for k in keys if ratios[k])]
        if rep.get("compile"):
            c = rep["compile"]
            state = "compiled" if c["compiled"] else f"fell back to eager ({c['fallback_reason'][:160]} …)"
            lines += ["", f"torch.compile: {state}; compilation {c['compile_s']} s (first call {c['first_call_s']} s)."]
        if rep.get("profile"):
            names = list(rep["profile"])
            lines += ["", "| rank | " + " | ".join(f"`{n}`: op, self ms, share" for n in names) + " |"]
            lines += ["|---:|" + "---|" * len(names)]
            for i in range(max(len(v) for v in rep["profile"].values())):
                cells = []
                for n in names:
                    ops = rep["profile"][n]
                    if i >= len(ops):
                        cells.append("")
                        continue
                    op = ops[i]["op"].replace("aten::", "").replace("autograd::engine::evaluate_function: ", "∂")
                    if op.startswith("## Call CompiledFxGraph"):
                        op = "Inductor graph " + op.split()[3][:6]
                    cells.append(f"{op} {ops[i]['self_cpu_ms']:.1f} ({ops[i]['share']:.0%})")
                lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
        lines.append("")
    first = next(iter(reports.values()))
    v, m = first["versions"], first["machine"]
    lines.append(
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, load average at the end "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_at_end'] or [])}; "
        + ", ".join(f"{k} {val}" for k, val in v.items())
        + "."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="toy", help="a dsv3lab preset (default toy)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (each runs every variant once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)}, or several comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-transformers", action="store_true", help="compare dsv3lab variants only")
    p.add_argument("--compile", action="store_true", help="also time the fast path under torch.compile")
    p.add_argument("--profile", action="store_true", help="top operators by self CPU time (torch.profiler)")
    p.add_argument("--profile-top", type=int, default=15, help="operators listed per profiled variant")
    p.add_argument("--profile-steps", type=int, default=5, help="profiled steps per variant (median per operator)")
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n matmul probe (default 2048)")
    p.add_argument("--figure", default=None, help="write the roofline figure (PNG) here")
    p.add_argument("--from-json", default=None, metavar="JSON", help="measure nothing: use this saved output")
    p.add_argument("--markdown", action="store_true", help="print the README tables instead of the JSON")
    args = p.parse_args(argv)
    if args.from_json:
        out = json.loads(Path(args.from_json).read_text())
        if args.figure:
            draw_roofline(out["runs"] if "runs" in out else {out["dtype"]: out}, args.figure)
        if args.markdown or not args.figure:
            print(markdown(out))
        return 0
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        p.error(f"--dtype: unknown {bad or args.dtype!r}; allowed: {', '.join(DTYPES)} (comma-separated)")
    reports = {dt: run(args, dt) for dt in dtypes}
    if args.figure:
        draw_roofline(reports, args.figure)
    out = reports[dtypes[0]] if len(dtypes) == 1 else {"benchmark": "train_step", "runs": reports}
    if args.figure:
        out["figure"] = args.figure
    print(markdown(out) if args.markdown else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
