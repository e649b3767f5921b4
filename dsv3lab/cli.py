"""The ``dsv3lab`` command line.

Commands::

    dsv3lab info PRESET [--json] [--set key=value ...]
    dsv3lab train [--preset toy] [--steps N] [--set key=value ...] --out DIR [--resume | --overwrite]
    dsv3lab train --from RUN_OR_CKPT [--stage sft|grpo] [--steps N] [--set key=value ...] --out NEW_DIR  (a stage)
    torchrun --nproc-per-node N -m dsv3lab train ... --set dp=.. --set ep=..   (several processes: FSDP2, EP)
    dsv3lab reproduce [--fast] [--only NAME ...] [--out DIR] [--list]
    dsv3lab generate --checkpoint DIR --prompt TEXT [--speculative mtp] [--json] [sampling options]
                                                   (also under torchrun: heads and experts split over the ranks)
    dsv3lab convert SRC DST [--fp8 | --bf16] [--dtype D] [--rotate-half] [--to hf|dsv3lab]
    dsv3lab memory [PRESET] [--budget 80GB] [--batch N] [--json]
    dsv3lab plan PRESET [--gpus N] [--gpu-mem 80GB] [--pp P] [--ep E] [--zero Z] [--micro-batch B] [--seq T] [--json]
                 [--infer --tp 4 --redundant-experts 32] [--paper]
    dsv3lab pipeline SCHEDULE --pp N --micro M [--f F --b B --w W --fb FB] [--p2p T --a2a T --no-overlap] [--json]
    dsv3lab pipeline SCHEDULE --pp N --micro M --execute [--preset P] [--steps S] [--out FILE]   (also under torchrun)
    dsv3lab ep [--preset tiny] [--nproc N] [--replicas R] [--moe-impl loop|grouped] [--json]    (also under torchrun)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import traceback
import warnings
from pathlib import Path

import pandas as pd
import torch
from safetensors import SafetensorError

from . import reproduce
from .accounting import kv_cache_bytes_per_token, max_context, model_stats
from .config import PRESETS, ModelConfig
from .infer import convert, generate, load_any, load_tokenizer
from .infer.generation import decode
from .infer.tensor_parallel import join_launched_group, launched_world_size, leave_launched_group, load_sharded
from .parallel.expert import format_ep_check, run_ep_check
from .parallel.schedules import SCHEDULES, make_schedule
from .parallel.simulator import TABLE2_FORMULAS, Costs, chunk_times, simulate, table2, table2_assumptions
from .plan import GPUS, Layout, gpu_spec, paper_checks, plan, plan_inference
from .train import TrainConfig, TrainingDiverged, latest_checkpoint, train
from .train.grpo import train_grpo
from .train.stages import stage_config
from .utils import check_device, env_flag, parse_size
from .viz.pipeline import plot_gantt


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def cmd_info(args: argparse.Namespace) -> int:
    cfg = ModelConfig.preset(args.preset)
    if args.set:
        cfg = cfg.with_overrides(args.set)
    stats = model_stats(cfg)
    if args.json:
        stats["config"] = cfg.to_dict()
        print(json.dumps(stats, indent=2))
        return 0
    kv = stats["kv_cache_bytes_per_token"]
    print(cfg.summary())
    print(f"total_params              {stats['total_params']:>20,}  ({_human(stats['total_params'])}, MTP excluded)")
    print(
        f"activated_params          {stats['activated_params']:>20,}  ({_human(stats['activated_params'])}, "
        "embedding and head included)"
    )
    print(f"mtp_params                {stats['mtp_params']:>20,}  ({_human(stats['mtp_params'])}, D={cfg.n_mtp})")
    print(
        f"kv_cache_bytes_per_token  latent {kv['latent']:,} | materialized {kv['materialized']:,} "
        f"({kv['materialized'] / kv['latent']:.1f}x) BF16, all layers"
    )
    print(
        f"flops_per_token           {stats['flops_per_token']:>20,.0f}  ({_human(stats['flops_per_token'])}; "
        f"{stats['flops_per_token_note']})"
    )
    return 0


def set_threads(threads: int) -> None:
    """``--threads N``: torch CPU threads (0 = torch's own choice)."""
    if threads < 0:
        raise ValueError(f"--threads must be >= 0 (0 = torch's choice), got {threads}")
    if threads:
        torch.set_num_threads(threads)


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: choose one")
    set_threads(args.threads)
    check_device(args.device)
    env = dict(out=args.out, device=args.device, progress=not args.quiet)
    if args.init_from:  # a new stage: the parent run's settings, then --steps and --set
        if args.preset is not None:
            raise ValueError("--from continues the parent's model: drop --preset (change settings with --set)")
        cfg = stage_config(args.init_from, args.set, **env, **({"steps": args.steps} if args.steps else {}))
    else:
        cfg = TrainConfig(preset=args.preset or "toy", **env)
        if args.steps is not None:
            cfg = cfg.replace(steps=args.steps)
        cfg = cfg.with_overrides(args.set)
    if args.stage:
        cfg = cfg.replace(stage=args.stage)
    cfg.model_config()  # validate the model settings before any data is built
    run = train_grpo if cfg.stage == "grpo" else train
    result = run(cfg, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 reports; every rank has logged its own lines
        return 0
    m = result.metrics
    if cfg.stage == "grpo":
        last = m.iloc[-1] if len(m) else None
        if last is not None:
            print(
                f"step {int(last.step) + 1}/{cfg.steps}: reward {last.reward:.3f}, correct {last.correct:.3f}, "
                f"format {last.format:.3f}, KL {last.kl:.4f}"
            )
        if len(result.val):
            v = result.val.iloc[-1]
            print(f"held-out problems (greedy): accuracy {v.accuracy:.3f}, format {v.format:.3f} (n={int(v.n)})")
        print(f"run folder: {args.out} (metrics.csv, val.csv, checkpoint, reference/, tokenizer)")
        return 0
    last = m.iloc[-1] if len(m) else None
    if last is not None:
        print(
            f"step {int(last.step) + 1}/{cfg.steps}: train loss {last.loss_main:.4f}, tokens seen "
            f"{int(last.tokens_seen):,}, MaxVio {last.maxvio_batch:.3f}"
        )
    final = result.final_val()
    if len(final):
        print("validation: " + ", ".join(f"{d} loss {r.loss:.4f} acc {r.acc:.3f}" for d, r in final.iterrows()))
    print(f"run folder: {args.out} (metrics.csv, val.csv, expert_load.csv, loads.npz, checkpoint, tokenizer)")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    if args.list:
        for name, exp in reproduce.load_registry().items():
            print(f"{name:16s} {exp.title}")
        return 0
    set_threads(args.threads)
    if args.device is not None:
        check_device(args.device)
    reproduce.run(out=args.out, fast=args.fast, only=args.only, device=args.device)
    print(f"wrote {args.out}/REPORT.md and {args.out}/summary.json")
    return 0


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _dtype(name: str | None):
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(_DTYPES)}, got {name!r}")
    return getattr(torch, _DTYPES[name])


def cmd_generate(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed if args.seed is not None else 0)
    if args.device is not None:
        check_device(args.device)
    if args.ids is not None and not args.bos:
        raise ValueError("--no-bos only applies to text prompts (--prompt); --ids are used exactly as given")
    if args.fp8_gemm is not None:
        warnings.warn(
            "--fp8-gemm dequant|fp8 is deprecated: use --quantize-activations", DeprecationWarning, stacklevel=1
        )
    if args.quantize_activations and not args.keep_fp8:
        raise ValueError("--quantize-activations computes with the kept FP8 weights: add --keep-fp8")
    if args.prompt and args.ids is not None:
        raise ValueError("give either --prompt TEXT or --ids 1,2,3, not both")
    load = dict(
        dtype=_dtype(args.dtype),
        keep_fp8=args.keep_fp8,
        quantize_activations=args.quantize_activations or args.fp8_gemm == "fp8",
    )
    rank, launched = 0, launched_world_size() > 1
    if launched:  # torchrun: this process holds its heads and experts (infer.tensor_parallel)
        rank, _, device = join_launched_group(args.device)
        model = load_sharded(args.checkpoint, device=device, **load)
    else:
        model = load_any(args.checkpoint, device=args.device, **load)
    tokenizer = None
    if args.ids is None:
        if not args.prompt:
            raise ValueError("give --prompt TEXT (or --ids 1,2,3 for a checkpoint without tokenizer.json)")
        tokenizer = load_tokenizer(args.checkpoint)
        prompts = list(args.prompt)
    else:
        try:
            prompts = [[int(t) for t in args.ids.split(",") if t.strip()]]
        except ValueError:
            raise ValueError(f"--ids must be comma-separated integers, got {args.ids!r}") from None
    stream = not args.json and len(prompts) == 1 and rank == 0  # every rank decodes the same tokens; rank 0 prints
    printed = {"text": "", "ids": []}

    def on_token(i: int, tok: int) -> None:  # print the new part of the decoded text (bytes may merge)
        printed["ids"].append(tok)
        if tokenizer is None:
            print(("" if len(printed["ids"]) == 1 else " ") + str(tok), end="", flush=True)
            return
        text = decode(tokenizer, printed["ids"])
        if text.startswith(printed["text"]):
            print(text[len(printed["text"]) :], end="", flush=True)
            printed["text"] = text

    out = generate(
        model,
        prompts,
        tokenizer=tokenizer,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        cache_layout=args.cache
        if args.attn_impl is None
        else {"absorb": "latent", "naive": "per_head"}[args.attn_impl],
        speculative=args.speculative,
        depth=args.depth,
        add_bos=tokenizer is not None and args.bos,
        on_token=on_token if stream else None,
    )
    if launched:
        leave_launched_group()
        if rank != 0:
            return 0
    if args.json:
        result = out.to_dict()
        if len(prompts) == 1:  # one prompt: its ids and text, not lists of one
            result["ids"], result["finish"] = result["ids"][0], result["finish"][0]
            if "texts" in result:
                result["text"] = result.pop("texts")[0]
        print(json.dumps(result, indent=2))
    elif stream:
        print()
        if out.speculative is not None:
            print(
                f"[acceptance rate {out.acceptance_rate:.2f}, {out.tokens_per_forward:.2f} tokens per "
                "main-model forward]",
                file=sys.stderr,
            )
    else:
        for i, item in enumerate(out.texts if out.texts is not None else out.ids):
            print(f"[{i}] {item}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    fp8 = True if args.fp8 else (False if args.bf16 else None)
    dtype = _dtype(args.dtype) or (_dtype("bfloat16") if args.bf16 else None)
    rope = False if args.rotate_half else (True if args.interleave else None)
    out = convert(
        args.src,
        args.dst,
        to=args.to,
        fp8=fp8,
        dtype=dtype,
        rope_interleave=rope,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun (a sharded run, each rank writing its part): rank 0
        print(f"wrote {out}")
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    budget = parse_size(args.budget)
    for name, value in (("--budget", budget), ("--batch", args.batch), ("--bytes-per-value", args.bytes_per_value)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    names = [args.preset] if args.preset else list(PRESETS)
    rows = []
    for name in names:
        cfg = ModelConfig.preset(name)
        if args.set:
            cfg = cfg.with_overrides(args.set)
        kv = kv_cache_bytes_per_token(cfg, args.bytes_per_value)
        rows.append(
            {
                "preset": name,
                "latent_bytes_per_token": kv["latent"],
                "materialized_bytes_per_token": kv["materialized"],
                "ratio": kv["materialized"] / kv["latent"],
                "budget_bytes": budget,
                "batch": args.batch,
                "max_context_latent": max_context(cfg, budget, args.batch, True, args.bytes_per_value),
                "max_context_materialized": max_context(cfg, budget, args.batch, False, args.bytes_per_value),
                "max_seq_len": cfg.max_seq_len,
            }
        )
    if args.json:
        print(json.dumps(rows[0] if args.preset else rows, indent=2))
        return 0
    print(
        f"KV cache, {args.bytes_per_value} bytes per value, all layers; budget {budget:,} bytes for the cache "
        f"alone (weights not included), batch {args.batch}"
    )
    print(
        f"{'preset':8s} {'latent B/token':>15s} {'K/V B/token':>13s} {'ratio':>6s} {'max ctx latent':>15s} "
        f"{'max ctx K/V':>12s} {'max_seq_len':>12s}"
    )
    for r in rows:
        print(
            f"{r['preset']:8s} {r['latent_bytes_per_token']:>15,} {r['materialized_bytes_per_token']:>13,} "
            f"{r['ratio']:>5.1f}x {r['max_context_latent']:>15,} {r['max_context_materialized']:>12,} "
            f"{r['max_seq_len']:>12,}"
        )
    return 0


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = ModelConfig.preset(args.preset)
    if args.set:
        cfg = cfg.with_overrides(args.set)
    gpu = gpu_spec(args.gpu)
    mem = parse_size(args.gpu_mem) if args.gpu_mem else gpu.memory_bytes
    if args.paper:
        result = paper_checks(cfg)
        if args.json:
            print(json.dumps(result, indent=2))
            return 0
        t = result["training"]
        print(
            f"training layout {result['training_layout']['gpus']} H800, PP16 DualPipe, EP64, ZeRO-1: fullest rank "
            f"{_gb(t['per_gpu_bytes']['total'])} of {_gb(GPUS['H800'].memory_bytes)} -> "
            f"{'fits' if t['fits'] else 'does NOT fit'}"
        )
        print(
            f"180K H800 GPU-hours per 10^12 tokens at {result['flops_per_token_4k'] / 1e9:.1f} GFLOP/token imply "
            f"MFU {result['implied_mfu_bf16']:.1%} of the BF16 peak ({result['implied_mfu_fp8']:.1%} of FP8)"
        )
        print(
            f"at that MFU: pre-training {result['pre_training_gpu_hours'] / 1e3:,.0f}K GPU-hours (paper 2,664K), "
            f"context extension {result['context_extension_gpu_hours_at_that_mfu'] / 1e3:,.0f}K (paper 119K, i.e. "
            f"MFU {result['context_extension_implied_mfu']:.1%}), total with post-training "
            f"{result['total_gpu_hours_at_that_mfu'] / 1e6:.3f}M (paper 2.788M = "
            f"${result['cost_usd_at_2_per_hour'] / 1e6:.3f}M at $2 per GPU-hour)"
        )
        for name in ("prefill", "decode"):
            r = result[name]
            print(
                f"{name}: {r['layout']['gpus']} GPUs, {r['layout']['experts_per_gpu']:g} experts per GPU, weights "
                f"{_gb(r['per_gpu_bytes']['weights_total'])} per GPU, latent KV cache for "
                f"{r['kv_cache_tokens']:,} tokens -> {'fits' if r['fits'] else 'does NOT fit'}"
            )
        return 0
    if args.infer:
        names = ("gpus", "tp", "ep", "redundant_experts", "shared_as_routed", "dense_tp", "mtp", "seq")
        result = plan_inference(cfg, gpu_mem=mem, **{k: getattr(args, k) for k in names})
        if args.json:
            print(json.dumps(result, indent=2))
            return 0
        print(f"{cfg.name} inference on {args.gpus} GPUs of {_gb(mem)}: {result['layout']}")
        for k, v in result["per_gpu_bytes"].items():
            print(f"  {k:24s} {_gb(v):>12s}")
        print(
            f"latent KV cache: {result['kv_cache_tokens']:,} tokens per GPU ({result['kv_sequences']:,} sequences "
            f"of {args.seq}) -> {'fits' if result['fits'] else 'does NOT fit'}"
        )
        return 0
    layout = Layout(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Layout)})
    result = plan(cfg, layout, gpu=gpu, gpu_mem=mem, rec=args.recipe, mfu=args.mfu, peak=args.peak)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{cfg.name} on {layout.gpus} x {gpu.name} ({_gb(mem)}): PP{layout.pp} {layout.schedule}, DP{layout.dp}, "
        f"EP{layout.ep} ({result['layout']['experts_per_gpu']} experts per GPU), ZeRO-{layout.zero}, micro-batch "
        f"{layout.micro_batch} x {layout.seq} tokens, recipe {result['recipe']}"
    )
    print(f"per-GPU memory of the fullest pipeline rank ({result['fullest_rank']}):")
    for k, v in result["per_gpu_bytes"].items():
        print(f"  {k:26s} {_gb(v):>12s}")
    for k, v in result["memo"].items():
        print(f"  ({k}: {_gb(v) if k.endswith('_bytes') else v})")
    for line in result["explanation"]:
        print(line)
    print(
        f"step of {layout.global_batch} x {layout.seq} tokens: {result['step_s']:.1f} s; "
        f"{result['gpu_hours_per_trillion_tokens'] / 1e3:,.1f}K GPU-hours per 10^12 tokens at MFU {result['mfu']:.1%} "
        f"({result['mfu_source']}; {result['flops_per_token'] / 1e9:.1f} GFLOP/token, main model + MTP)"
    )


def cmd_pipeline(args: argparse.Namespace) -> int:

    if args.execute:
        return _pipeline_execute(args)
    if args.schedule not in SCHEDULES:
        raise ValueError(f"the simulator knows {', '.join(SCHEDULES)}; {args.schedule} runs with --execute only")

    costs = Costs(f=args.f, b=args.b, w=args.w, fb=args.fb, p2p=args.p2p, a2a=args.a2a, overlap=not args.no_overlap)
    timeline = simulate(make_schedule(args.schedule, args.pp, args.micro), costs)
    summary = timeline.summary()
    if args.plot:
        plot_gantt(timeline).savefig(args.plot, dpi=110, bbox_inches="tight")
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    row, formula = table2(args.schedule, args.pp, costs), TABLE2_FORMULAS[args.schedule]
    t = chunk_times(costs)
    broken = table2_assumptions(args.schedule, costs)
    print(
        f"{args.schedule}: PP = {args.pp} stages on {summary['devices']} devices, {args.micro} micro-batches; chunk "
        f"times F = {t['F']:g}, B = {t['B']:g}, W = {t['W']:g}, F&B = {t['F&B']:g} (p2p {args.p2p:g}, a2a "
        f"{args.a2a:g}, overlap {'off' if args.no_overlap else 'on'})"
    )
    verdict = "equal" if math.isclose(summary["bubble"], row["bubble"], rel_tol=1e-9, abs_tol=1e-9) else "differs"
    print(f"makespan     {summary['makespan']:g}")
    print(
        f"bubble       {summary['bubble']:g} per device (largest over devices); Table 2 {formula[0]} = "
        f"{row['bubble']:g} ({verdict})"
    )
    print(
        f"activations  {summary['activation_peak']} micro-batch activations per device; "
        f"Table 2 {formula[2]} = {row['activation']}"
    )
    print(f"parameters   {summary['param_copies']}x per device; Table 2 {formula[1]}")
    if broken:
        print("Table 2's formula is exact only when: " + "; ".join(broken) + " (not met here)")
    print(f"{'rank':>4s} {'busy':>10s} {'bubble':>10s} {'activations':>12s} {'params':>7s}")
    for r in summary["per_rank"]:
        print(
            f"{r['rank']:>4d} {r['busy']:>10g} {r['bubble']:>10g} {r['activation_peak']:>12d} {r['param_copies']:>6d}x"
        )
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _pipeline_execute(args: argparse.Namespace) -> int:

    from .parallel.pipeline import (  # torch.distributed.pipelining takes seconds to import: --execute only
        RUNTIMES,
        PipelineSpec,
        devices_for,
        executed_vs_simulated,
        records_to_json,
        run_pipeline,
    )

    if args.json:
        raise ValueError("--json prints the simulation; with --execute write the measured run with --out FILE")
    base = ModelConfig.preset(args.preset).to_dict()
    changed = ModelConfig.preset(args.preset).with_overrides(args.set).to_dict()
    overrides = {k: v for k, v in changed.items() if base.get(k) != v}
    spec = PipelineSpec(
        schedule=args.schedule,
        preset=args.preset,
        overrides=overrides,
        n_micro=args.micro,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        steps=args.steps,
        measure_p2p=True,
        device=args.device,
    )
    world = devices_for(args.schedule, args.pp)
    records = run_pipeline(spec, world)
    if records is None:  # a torchrun rank other than 0
        return 0
    engine = "torch.distributed.pipelining" if RUNTIMES[args.schedule][0] == "torch" else "dsv3lab's executor"
    cfg = spec.model_config()
    print(
        f"executed {args.schedule}: PP = {args.pp} stages on {world} processes ({engine}, "
        f"{'nccl' if args.device == 'cuda' else 'gloo'}), {args.micro} micro-batches of {args.micro_batch} x "
        f"{args.seq_len} tokens, {args.preset} preset ({cfg.n_layers} layers, MTP D = {cfg.n_mtp}), {args.steps} steps"
    )
    for step in range(spec.steps):
        losses = [t["main"] for r in records for t in r["steps"][step]["losses"]]
        seconds = max(r["steps"][step]["seconds"] for r in records)
        print(
            f"step {step}: main loss {sum(losses) / len(losses):.4f} over {len(losses)} micro-batches, {seconds:.3f} s"
        )
    comparison = executed_vs_simulated(records, spec)
    rows = pd.DataFrame(comparison)
    table = rows.groupby(["rank", "source"])[["busy_s", "idle_s", "makespan_s"]].mean().unstack("source")
    first = 1 if spec.steps > 1 else 0
    print(
        f"busy and idle seconds per rank, mean over steps {first}..{spec.steps - 1}: measured, and simulated for the "
        f"same order with the measured chunk times and p2p {records[0].get('p2p_seconds', 0.0) * 1e3:.2f} ms"
    )
    print(table.round(4).to_string())
    if args.out:
        Path(args.out).write_text(json.dumps(records_to_json(spec, records, comparison), indent=1))
        print(f"wrote {args.out}")
    return 0


def cmd_ep(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    names = ("nproc", "preset", "batch", "seq_len", "seed", "replicas", "moe_impl")
    results = run_ep_check(**{k: getattr(args, k) for k in names})
    if results is None:  # a torchrun rank other than 0
        return 0
    print(json.dumps(results, indent=2) if args.json else format_ep_check(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3lab", description="DeepSeek-V3 research workbench")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also DSV3LAB_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameters, activation, MTP, KV cache and FLOPs of a preset")
    p.add_argument("preset", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train a model; metrics, checkpoints and the tokenizer go to --out")
    p.add_argument("--preset", default=None, help=f"model preset, one of: {', '.join(PRESETS)} (default toy)")
    p.add_argument(
        "--from",
        dest="init_from",
        default="",
        metavar="RUN_OR_CKPT",
        help="start a new stage from this run's latest checkpoint (or this ckpt-* folder): its weights and settings, "
        "changed by --set (RoPE/YaRN, sequence length, data, schedule ...); writes a new run folder --out",
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: TrainConfig.steps)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a TrainConfig or ModelConfig field, e.g. balance=aux_loss, n_mtp=0, lr=1e-3 (repeatable)",
    )
    p.add_argument(
        "--stage",
        choices=("pretrain", "sft", "grpo"),
        default=None,
        help="what the run trains (TrainConfig.stage): pretrain (default), sft (worked math solutions, the prompt "
        "masked), grpo (§5.2.2, rule-based rewards); post-training usually starts --from a run",
    )
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("reproduce", help="run the experiments; write figures, REPORT.md and summary.json")
    p.add_argument("--fast", action="store_true", help="one seed, short runs (minutes)")
    p.add_argument("--only", action="append", metavar="NAME", help="run only this experiment (repeatable)")
    p.add_argument("--out", default="figures", help="output folder (default: figures/)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser(
        "generate",
        help="generate text from a checkpoint with the latent KV cache (optionally MTP speculative decoding)",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="official-layout or dsv3lab checkpoint folder")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--ids", default=None, help="prompt token ids, comma-separated (instead of --prompt)")
    p.add_argument(
        "--no-bos",
        dest="bos",
        action="store_false",
        help="do not put the bos token before a text prompt (default: put it, as training documents start)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--speculative",
        choices=["mtp"],
        default=None,
        help="draft with the MTP modules, verify in one "
        "main-model forward (one prompt; greedy, or speculative sampling with --temperature)",
    )
    p.add_argument("--depth", type=int, default=None, help="MTP drafts per round (default: every MTP module)")
    p.add_argument(
        "--cache",
        choices=["latent", "per_head"],
        default="latent",
        help="KV-cache layout: the MLA latent (default, the absorbed path) or per-head K/V",
    )
    p.add_argument("--attn-impl", choices=["absorb", "naive"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the checkpoint's)")
    p.add_argument(
        "--keep-fp8",
        action="store_true",
        help="keep an FP8 checkpoint's projections in E4M3 (1 byte per weight) instead of dequantising them on load",
    )
    p.add_argument(
        "--quantize-activations",
        action="store_true",
        help="with --keep-fp8: quantise the activations per 1x128 tile too and multiply FP8 by FP8 (the official "
        "fp8 gemm_impl); default: dequantise each weight just before its GEMM",
    )
    p.add_argument("--fp8-gemm", choices=["dequant", "fp8"], default=None, help=argparse.SUPPRESS)  # old name
    p.add_argument("--json", action="store_true", help="print text, ids, acceptance_rate, tokens_per_forward as JSON")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="convert checkpoints: dsv3lab <-> official Hugging Face layout, FP8 <-> BF16")
    p.add_argument("src", help="official-layout folder, dsv3lab folder (dsv3lab_config.json) or training run")
    p.add_argument("dst", help="output folder (written atomically)")
    p.add_argument("--to", choices=["hf", "dsv3lab"], default="hf", help="target layout (default: hf)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fp8", action="store_true", help="block-FP8 (E4M3, 128x128 scales) projections")
    g.add_argument("--bf16", action="store_true", help="dequantise to BF16")
    p.add_argument("--dtype", default=None, help="dtype of the non-FP8 tensors (float32 or bfloat16)")
    r = p.add_mutually_exclusive_group()
    r.add_argument(
        "--rotate-half", action="store_true", help="write the rotate-half RoPE layout (rope_interleave=false)"
    )
    r.add_argument("--interleave", action="store_true", help="write the interleaved RoPE layout (the official one)")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "memory",
        help="KV-cache bytes per token (latent vs materialised K/V) and the longest context that fits a memory budget",
    )
    p.add_argument("preset", nargs="?", default=None, help=f"one of: {', '.join(PRESETS)} (default: all)")
    p.add_argument("--budget", default="80GB", help="memory for the KV cache, e.g. 80GB or 64GiB (default 80GB)")
    p.add_argument("--batch", type=int, default=1, help="sequences sharing the budget (default 1)")
    p.add_argument("--bytes-per-value", type=int, default=2, help="2 = BF16 cache (default), 4 = FP32, 1 = FP8")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser(
        "plan",
        help="per-GPU memory, fit, step time and GPU-hours of a training (or --infer serving) layout; --paper checks "
        "the paper's layouts and cost",
    )
    p.add_argument("preset", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--gpus", type=int, default=2048, help="GPUs in all (default 2048, the paper's)")
    p.add_argument("--gpu", default="H800", help="H800 (default), H100, H200 or A100: peak FLOP/s and memory")
    p.add_argument("--gpu-mem", default=None, help="memory per GPU, e.g. 80GB or 80GiB (default: the --gpu's)")
    p.add_argument("--pp", type=int, default=16, help="pipeline ranks (default 16)")
    p.add_argument("--ep", type=int, default=64, help="expert-parallel size within the data-parallel ranks (64)")
    p.add_argument("--zero", type=int, default=1, help="ZeRO stage 0-3 (default 1)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--seq", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--schedule", default="dualpipe", help="1f1b, zb1p, dualpipe (default) or dualpipev")
    p.add_argument("--global-batch", type=int, default=15360, help="sequences per optimizer step (default 15360)")
    p.add_argument("--recipe", default="paper", help="paper (default), fp32, bf16 or fp8 (dsv3lab's trainer)")
    p.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation (default: the paper's, implied)")
    p.add_argument("--peak", default="bf16", choices=["bf16", "fp8"], help="the peak the MFU refers to")
    p.add_argument("--infer", action="store_true", help="plan serving in FP8 instead of training")
    p.add_argument("--tp", type=int, default=4, help="--infer: tensor-parallel attention size (default 4)")
    p.add_argument("--dense-tp", type=int, default=None, help="--infer: tensor-parallel size of the dense MLPs")
    p.add_argument("--redundant-experts", type=int, default=0, help="--infer: extra expert replicas")
    p.add_argument("--shared-as-routed", action="store_true", help="--infer: shared experts take expert slots")
    p.add_argument("--mtp", action="store_true", help="--infer: keep the MTP modules (speculative decoding)")
    p.add_argument("--paper", action="store_true", help="check the paper's training and serving layouts and cost")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "pipeline",
        help="simulate a pipeline schedule (1F1B, ZB1P, DualPipe, DualPipeV): bubble, makespan, memory vs Table 2",
    )
    p.add_argument(
        "schedule",
        choices=["1f1b", "zb1p", "dualpipe", "dualpipev", "interleaved_zb", "zbv"],
        help="the last two with --execute only",
    )
    p.add_argument("--pp", type=int, required=True, help="pipeline stages as in Table 2 (DualPipeV: on pp/2 devices)")
    p.add_argument("--micro", type=int, required=True, help="micro-batches per optimizer step")
    p.add_argument("--f", type=float, default=1.0, help="forward chunk time (default 1)")
    p.add_argument("--b", type=float, default=2.0, help="full backward chunk time (default 2)")
    p.add_argument("--w", type=float, default=1.0, help="weight-gradient part of the backward (default 1)")
    p.add_argument("--fb", type=float, default=None, help="an overlapped F&B pair (default F + B)")
    p.add_argument("--p2p", type=float, default=0.0, help="point-to-point transfer time between ranks (default 0)")
    p.add_argument("--a2a", type=float, default=0.0, help="all-to-all time per chunk, hidden in F&B (default 0)")
    p.add_argument("--no-overlap", action="store_true", help="F&B pairs do not hide their all-to-all")
    p.add_argument("--plot", default=None, metavar="PNG", help="also write the Gantt chart to this file")
    p.add_argument("--json", action="store_true", help="print bubble, makespan, activation_peak, param_copies, ...")
    p.add_argument(
        "--execute",
        action="store_true",
        help="train on real processes instead (spawned, or this rank under torchrun) and compare with the simulator",
    )
    p.add_argument("--preset", default="tiny", help="--execute: model preset (default tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="--execute: a ModelConfig field")
    p.add_argument("--steps", type=int, default=3, help="--execute: optimizer steps (default 3)")
    p.add_argument("--micro-batch", type=int, default=2, help="--execute: sequences per micro-batch (default 2)")
    p.add_argument("--seq-len", type=int, default=32, help="--execute: tokens per sequence (default 32)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="--execute: cpu (gloo) or cuda (NCCL)")
    p.add_argument("--out", default=None, metavar="JSON", help="--execute: write the measured run (events) here")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser(
        "ep",
        help="expert parallelism on real processes: one training step of a preset with its MoE layers sharded, "
        "against one process (torchrun, or --nproc processes started here)",
    )
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    p.add_argument("--nproc", type=int, default=2, help="processes to start when not under torchrun (default 2)")
    p.add_argument("--batch", type=int, default=2, help="sequences per rank (default 2)")
    p.add_argument("--seq-len", type=int, default=16, help="tokens per sequence (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replicas", type=int, default=0, help="EPLB slots per layer (0 = no redundant experts)")
    p.add_argument(
        "--moe-impl", choices=["loop", "grouped"], default="loop", help="local experts: loop or grouped GEMM"
    )
    p.add_argument("--json", action="store_true", help="print every rank's result as JSON")
    p.set_defaults(func=cmd_ep)
    return parser


EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
# the library's own errors and the expected OS and format errors: one line each, no traceback (--debug shows it)
BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, SafetensorError)


def main(argv: list[str] | None = None) -> int:
    """The CLI's one error boundary. Exit codes: 0 done, 2 bad input (a refused argument, config, checkpoint or
    file), 1 a failed operation (training diverged, disk full, read-only folder …), 130 interrupted (Ctrl-C). Each
    error is one line: what went wrong, which file, what to do; ``--debug`` or ``DSV3LAB_DEBUG=1`` adds the
    traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        debug = args.debug or env_flag("DSV3LAB_DEBUG")
    except ValueError as err:
        print(f"dsv3lab: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    prefix = f"dsv3lab {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\n{prefix}: interrupted{_resume_hint(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingDiverged as err:
        _report(prefix, err, debug)
        return EXIT_FAILED
    except BAD_INPUT as err:
        _report(prefix, err, debug)
        return EXIT_BAD_INPUT
    except OSError as err:  # disk full, permission denied, a read-only folder: the input was fine, the operation failed
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        _report(prefix, f"{err.strerror or err}{where}; nothing was published at the target (writes are atomic)", debug)
        return EXIT_FAILED


def _report(prefix: str, err: BaseException | str, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(f"{prefix}: error: {err}", file=sys.stderr)


def _resume_hint(args: argparse.Namespace) -> str:
    """After Ctrl-C in ``dsv3lab train``: nothing new was checkpointed; say where the run can continue from."""
    if args.command != "train":
        return ""
    try:
        ckpt = latest_checkpoint(Path(args.out))
    except (OSError, ValueError):
        ckpt = None
    if ckpt is None:
        return "; no checkpoint had been written: start again with the same command"
    return f"; nothing new was checkpointed; continue from {ckpt} with the same command and --resume"


if __name__ == "__main__":
    sys.exit(main())
