"""The ``dsv3lab`` command line.

Commands::

    dsv3lab info PRESET [--json] [--set key=value ...]
    dsv3lab train [--preset toy] [--steps N] [--set key=value ...] --out DIR [--resume | --overwrite]
    dsv3lab train --from RUN_OR_CKPT [--stage sft|grpo] [--steps N] [--set key=value ...] --out NEW_DIR  (a stage)
    dsv3lab reproduce [--fast] [--only NAME ...] [--out DIR] [--list]
    dsv3lab generate --checkpoint DIR --prompt TEXT [--speculative mtp] [--json] [sampling options]
    dsv3lab convert SRC DST [--fp8 | --bf16] [--dtype D] [--rotate-half] [--to hf|dsv3lab]
    dsv3lab memory [PRESET] [--budget 80GB] [--batch N] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

from . import reproduce
from .accounting import kv_cache_bytes_per_token, max_context, model_stats
from .config import PRESETS, ModelConfig
from .infer import convert, generate, load_any, load_tokenizer
from .infer.checkpoint import parse_size
from .infer.generation import decode
from .train import TrainConfig, TrainingDiverged, train
from .train.grpo import train_grpo
from .train.stages import stage_config


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


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: choose one")
    if args.threads:
        torch.set_num_threads(args.threads)
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
    try:
        if cfg.stage == "grpo":
            result = train_grpo(cfg, resume=args.resume, overwrite=args.overwrite)
        else:
            result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except TrainingDiverged as err:
        print(f"dsv3lab train: {err}", file=sys.stderr)
        return 3
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
    if args.threads:
        torch.set_num_threads(args.threads)
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
    if args.fp8_gemm is not None:
        warnings.warn(
            "--fp8-gemm dequant|fp8 is deprecated: use --quantize-activations", DeprecationWarning, stacklevel=1
        )
    if args.quantize_activations and not args.keep_fp8:
        raise ValueError("--quantize-activations computes with the kept FP8 weights: add --keep-fp8")
    if args.prompt and args.ids is not None:
        raise ValueError("give either --prompt TEXT or --ids 1,2,3, not both")
    model = load_any(
        args.checkpoint,
        device=args.device,
        dtype=_dtype(args.dtype),
        keep_fp8=args.keep_fp8,
        quantize_activations=args.quantize_activations or args.fp8_gemm == "fp8",
    )
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
    stream = not args.json and len(prompts) == 1
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
    print(f"wrote {out}")
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    budget = parse_size(args.budget)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3lab", description="DeepSeek-V3 research workbench")
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
