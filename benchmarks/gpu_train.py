"""Train a preset on one GPU with dsv3lab's trainer; report tokens/s, MFU and peak memory against the planner.

    python benchmarks/gpu_train.py --preset small --steps 300 --out runs/gpu-bf16            # BF16 autocast
    python benchmarks/gpu_train.py --preset small --steps 300 --fp8 --out runs/gpu-fp8      # + FP8 GEMMs, BF16 moments

The run is ``dsv3lab.train.train`` (the same code as ``dsv3lab train``) with ``dtype=bf16``, and with ``--fp8`` also
``fp8=true`` and ``adam_moments=bf16`` (the paper's recipe as far as dsv3lab implements it). It leaves a normal run
folder in ``--out`` (checkpoint included), so ``dsv3lab convert`` and ``dsv3lab generate`` can serve the model
afterwards (``benchmarks/gpu_check.sh`` does).

Reported (JSON on stdout):

* ``tokens_per_s``: the median of the trainer's per-step tokens/s after ``--warmup`` steps;
* ``mfu``: tokens/s × training FLOPs per token (``accounting.flops_per_token``, main model and MTP) / the GPU's dense
  BF16 peak (``dsv3lab.plan.GPUS``; also against the FP8 peak with ``--fp8``) — ``null`` when the GPU is unknown;
* ``peak_memory_bytes``: ``torch.cuda.max_memory_allocated`` over the whole run, against ``planned_bytes``, the
  planner's total for one GPU (``dsv3lab.plan.plan`` with the ``bf16`` or ``fp8`` recipe, one micro-batch in flight).
  The trainer frees gradients after every step while the planner keeps them as persistent buffers, so the planner
  is expected to be somewhat above the measurement.

On a CPU (for tests) it runs as well: tokens/s is reported, MFU and the memory numbers are ``null``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from dsv3lab.accounting import flops_per_token
from dsv3lab.activations import RECIPES
from dsv3lab.plan import Layout, gpu_spec, plan
from dsv3lab.train import TrainConfig, train
from dsv3lab.utils import versions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16, help="sequences per step (one micro-batch)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--fp8", action="store_true", help="FP8 GEMMs and BF16 AdamW moments")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the tokens/s median")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="run folder (replaced if it holds a run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more TrainConfig fields")
    return p


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    cfg = TrainConfig(
        preset=args.preset,
        steps=args.steps,
        batch_size=args.batch,
        batch_size_start=args.batch,
        micro_batch_size=args.batch,
        seq_len=args.seq_len,
        dtype="bf16",
        adam_moments="bf16" if args.fp8 else "fp32",
        eval_every=0,
        device=args.device,
        out=args.out,
        progress=False,
        model={"fp8": True} if args.fp8 else {},
    ).with_overrides(args.set)
    model_cfg = cfg.model_config()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = train(cfg, overwrite=True)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    rates = list(result.metrics["tokens_per_s"])[args.warmup :] or list(result.metrics["tokens_per_s"])
    tokens_per_s = statistics.median(rates)
    flops = flops_per_token(model_cfg, args.seq_len, mtp=model_cfg.n_mtp > 0)

    gpu, mfu, mfu_fp8, planned = None, None, None, None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        try:
            gpu = gpu_spec(name)
        except ValueError:
            gpu = None
        if gpu is not None:
            mfu = tokens_per_s * flops / gpu.bf16_flops
            mfu_fp8 = tokens_per_s * flops / gpu.fp8_flops if gpu.fp8_flops else None
        rec = RECIPES["fp8" if args.fp8 else "bf16"]
        layout = Layout(gpus=1, pp=1, ep=1, zero=0, micro_batch=args.batch, seq=args.seq_len, schedule="1f1b")
        planned = plan(model_cfg, layout, gpu_mem=torch.cuda.get_device_properties(device).total_memory, rec=rec)
    last = result.metrics.iloc[-1]
    return {
        "benchmark": "gpu_train",
        "command": "python benchmarks/gpu_train.py " + " ".join(sys.argv[1:]),
        "preset": args.preset,
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "fp8": args.fp8,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "final_loss_main": float(last["loss_main"]),
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops,
        "mfu": mfu,
        "mfu_of_fp8_peak": mfu_fp8 if args.fp8 else None,
        "peak_memory_bytes": peak,
        "planned_bytes": planned["per_gpu_bytes"]["total"] if planned else None,
        "planned_items": planned["per_gpu_bytes"] if planned else None,
        "peak_over_planned": peak / planned["per_gpu_bytes"]["total"] if planned and peak else None,
        "run_folder": args.out,
        "versions": versions(),
    }


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(run(build_parser().parse_args(argv)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
