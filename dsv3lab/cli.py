"""The ``dsv3lab`` command line.

    dsv3lab info PRESET [--json] [--set key=value ...]
    dsv3lab train [--preset toy] [--steps N] [--set key=value ...] --out DIR [--resume | --overwrite]
    dsv3lab reproduce [--fast] [--only NAME ...] [--out DIR] [--list]
"""

from __future__ import annotations

import argparse
import json
import sys

from .accounting import model_stats
from .config import PRESETS, ModelConfig


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
    print(f"activated_params          {stats['activated_params']:>20,}  ({_human(stats['activated_params'])}, "
          "embedding and head included)")
    print(f"mtp_params                {stats['mtp_params']:>20,}  ({_human(stats['mtp_params'])}, D={cfg.n_mtp})")
    print(f"kv_cache_bytes_per_token  latent {kv['latent']:,} | materialized {kv['materialized']:,} "
          f"({kv['materialized'] / kv['latent']:.1f}x) BF16, all layers")
    print(f"flops_per_token           {stats['flops_per_token']:>20,.0f}  ({_human(stats['flops_per_token'])}; "
          f"{stats['flops_per_token_note']})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, TrainingDiverged, train

    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: choose one")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = TrainConfig(preset=args.preset, out=args.out, device=args.device, progress=not args.quiet)
    if args.steps is not None:
        cfg = cfg.replace(steps=args.steps)
    cfg = cfg.with_overrides(args.set)
    cfg.model_config()  # validate the model settings before any data is built
    try:
        result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except TrainingDiverged as err:
        print(f"dsv3lab train: {err}", file=sys.stderr)
        return 3
    m = result.metrics
    last = m.iloc[-1] if len(m) else None
    if last is not None:
        print(f"step {int(last.step) + 1}/{cfg.steps}: train loss {last.loss_main:.4f}, tokens seen "
              f"{int(last.tokens_seen):,}, MaxVio {last.maxvio_batch:.3f}")
    final = result.final_val()
    if len(final):
        print("validation: " + ", ".join(f"{d} loss {r.loss:.4f} acc {r.acc:.3f}" for d, r in final.iterrows()))
    print(f"run folder: {args.out} (metrics.csv, val.csv, expert_load.csv, loads.npz, checkpoint, tokenizer)")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from . import reproduce

    if args.list:
        for name, exp in reproduce.load_registry().items():
            print(f"{name:16s} {exp.title}")
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    reproduce.run(out=args.out, fast=args.fast, only=args.only, device=args.device)
    print(f"wrote {args.out}/REPORT.md and {args.out}/summary.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3lab", description="DeepSeek-V3 research workbench")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameters, activation, MTP, KV cache and FLOPs of a preset")
    p.add_argument("preset", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train a model; metrics, checkpoints and the tokenizer go to --out")
    p.add_argument("--preset", default="toy", help=f"model preset, one of: {', '.join(PRESETS)} (default toy)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: TrainConfig.steps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a TrainConfig or ModelConfig field, e.g. balance=aux_loss, n_mtp=0, lr=1e-3 (repeatable)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"dsv3lab {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
