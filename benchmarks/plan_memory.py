"""The planner's memory against what a training step of dsv3lab really allocates, item by item.

    python benchmarks/plan_memory.py [--preset toy] [--batch 2] [--seq-len 256] [--dtype fp32|bf16] [--fp8]
                                     [--adam-moments fp32|bf16] [--moe-impl loop|grouped] [--device cpu|cuda]

One process, one GPU or the CPU (``dsv3lab.plan`` with gpus=1, pp=1, ZeRO 0). Two numbers are compared:

* **static**: parameters, gradients and AdamW states, summed over the real tensors after one optimizer step, against
  the planner's ``parameters + gradients + optimizer_* + embedding_and_head``;
* **step**: the peak bytes allocated during the next forward and backward pass above what was live when it began
  (weights, gradients and optimizer states are then live, so they are excluded), from
  ``dsv3lab.utils.peak_step_memory`` — ``torch.profiler`` allocation events on a CPU,
  ``torch.cuda.max_memory_allocated`` on CUDA — against the planner's activations, FP8 caches, weight copies and
  loss working set.

The recipe compared with is ``fp32`` (dsv3lab's FP32 trainer), or for ``--dtype bf16`` the ``bf16`` recipe (autocast)
and with ``--fp8`` the ``fp8`` recipe. On a CPU, autocast runs attention in FP32 with the probabilities kept (SDPA's
math path), so for ``bf16`` on a CPU the planner is given that attention (``up``/``probs`` at 4 bytes, no
log-sum-exp). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import dsv3lab
from dsv3lab.activations import RECIPES
from dsv3lab.model import IGNORE_INDEX
from dsv3lab.plan import Layout, plan
from dsv3lab.train import TrainConfig
from dsv3lab.train.trainer import make_optimizer
from dsv3lab.utils import peak_step_memory, versions

STATIC = ("parameters", "gradients", "optimizer_master_weights", "optimizer_moments", "embedding_and_head")


def planner_recipe(dtype: str, fp8: bool, moments: str, device: torch.device):
    rec = RECIPES["fp8" if fp8 else dtype]
    if (fp8 or dtype == "bf16") and device.type == "cpu":
        rec = rec.replace(up=4.0, probs=4.0, lse=0.0)  # CPU autocast: SDPA's math path in FP32
    return rec.replace(moment=2.0 if moments == "bf16" else 4.0)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = dsv3lab.ModelConfig.preset(args.preset, moe_impl=args.moe_impl, fp8=args.fp8)
    model = dsv3lab.build_model(cfg, device=device, seed=0)
    model.train()
    tcfg = TrainConfig(preset=args.preset, out="-", adam_moments=args.adam_moments)
    opt = make_optimizer(model, tcfg)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=g).to(device)
    targets = tokens.roll(-1, 1)
    targets[:, -1] = IGNORE_INDEX
    autocast = args.dtype == "bf16" or args.fp8

    def step() -> None:  # forward and backward; gradients accumulate into the live .grad tensors
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            losses = model(tokens, targets)[1]
        losses["total"].backward()

    step()
    opt.step()  # the AdamW states now exist
    opt.zero_grad(set_to_none=False)  # gradients stay allocated, as the planner's persistent gradient buffers
    states = [t for s in opt.state.values() for t in s.values()]
    measured_static = tensor_bytes(model.parameters()) + tensor_bytes(p.grad for p in model.parameters())
    measured_static += tensor_bytes(states)
    measured_step = peak_step_memory(step, device)

    rec = planner_recipe(args.dtype, args.fp8, args.adam_moments, device)
    layout = Layout(gpus=1, pp=1, ep=1, zero=0, micro_batch=args.batch, seq=args.seq_len, schedule="1f1b")
    planned = plan(cfg, layout, gpu_mem=10**15, rec=rec)["per_gpu_bytes"]
    planned_static = sum(planned[k] for k in STATIC)
    planned_step = planned["total"] - planned_static
    return {
        "benchmark": "plan_memory",
        "command": "python benchmarks/plan_memory.py " + " ".join(sys.argv[1:]),
        "preset": args.preset,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "dtype": args.dtype,
        "fp8": args.fp8,
        "adam_moments": args.adam_moments,
        "moe_impl": args.moe_impl,
        "recipe": rec.name,
        "measured_static_mib": measured_static / 2**20,
        "planned_static_mib": planned_static / 2**20,
        "measured_step_mib": measured_step / 2**20,
        "planned_step_mib": planned_step / 2**20,
        "step_ratio_measured_over_planned": measured_step / planned_step,
        "static_ratio_measured_over_planned": measured_static / planned_static,
        "planned_items_mib": {k: v / 2**20 for k, v in planned.items()},
        "memory_method": "torch.profiler allocation events (CPU)"
        if device.type == "cpu"
        else "torch.cuda.max_memory_allocated (CUDA)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": versions(),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="toy")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--fp8", action="store_true", help="the FP8 recipe (implies bf16 autocast)")
    p.add_argument("--adam-moments", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--moe-impl", default="loop", choices=["loop", "grouped"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(run(build_parser().parse_args(argv)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
