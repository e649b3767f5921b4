"""Decode speed: dsv3lab's absorbed (latent) cache vs its naive (per-head K/V) cache vs transformers' ``generate``.

Same process, same config and weights (``dsv3lab.infer.hf.to_transformers``), greedy decoding after a prompt of each
context length. Runs alternate between the methods (the order rotates every repeat) so that load on a shared machine
hits all of them alike; each run times the decode phase only — from the first new token to the last, taken by a
streamer callback — and the report gives medians and ratios. Every method must produce the same tokens.

    python benchmarks/decode.py [--preset toy] [--contexts 512 2048] [--new-tokens 32] [--repeats 5] [--threads 2]
        [--dtype float32|bfloat16]

Prints JSON: per context, decode tokens/s per method (median and all runs), prefill seconds, and the ratios
absorb/naive and dsv3lab (absorb) / transformers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

import dsv3lab
from dsv3lab.infer.generation import generate

METHODS = ("dsv3lab_absorb", "dsv3lab_naive", "transformers")


class _Stamps:
    """A transformers streamer (and a dsv3lab on_token callback) that records when each new token arrives."""

    def __init__(self):
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._prompt_seen = False

    def put(self, value):  # transformers: first the prompt, then each new token
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.tokens.append(int(value.flatten()[0]))

    def end(self):
        pass

    def __call__(self, i: int, tok: int) -> None:  # dsv3lab
        self.times.append(time.perf_counter())
        self.tokens.append(tok)


def run_once(method: str, model, hf, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, list[int]]:
    """(decode tokens/s, prefill seconds, tokens) for one run."""
    stamps = _Stamps()
    t0 = time.perf_counter()
    if method == "transformers":
        with torch.inference_mode():
            hf.generate(
                prompt[None],
                max_new_tokens=new_tokens,
                do_sample=False,
                streamer=stamps,
                use_cache=True,
                eos_token_id=None,
                pad_token_id=0,
            )
    else:
        generate(
            model,
            prompt,
            max_new_tokens=new_tokens,
            stop_at_eos=False,
            on_token=stamps,
            cache_layout={"absorb": "latent", "naive": "per_head"}[method.removeprefix("dsv3lab_")],
        )
    if len(stamps.times) != new_tokens:
        raise RuntimeError(f"{method} produced {len(stamps.times)} tokens, expected {new_tokens}")
    decode_s = stamps.times[-1] - stamps.times[0]
    return (new_tokens - 1) / decode_s, stamps.times[0] - t0, stamps.tokens


def benchmark(
    preset: str = "toy",
    contexts: tuple[int, ...] = (512, 2048),
    new_tokens: int = 32,
    repeats: int = 5,
    threads: int = 2,
    seed: int = 0,
    dtype: str = "float32",
) -> dict:
    from dsv3lab.infer.hf import to_transformers

    torch.set_num_threads(threads)
    cfg = dsv3lab.ModelConfig.preset(preset)
    model = dsv3lab.build_model(cfg, seed=seed).eval()
    hf = to_transformers(model, attn_implementation="sdpa")
    if dtype == "bfloat16":  # both models in bf16 (weights and caches); the selection bias and RoPE tables stay fp32
        model.to(torch.bfloat16)
        hf.to(torch.bfloat16)
    elif dtype != "float32":
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    hf.generation_config.eos_token_id = None
    out: dict = {
        "preset": preset,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": threads,
        "dtype": dtype,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "versions": dsv3lab.versions(),
        "contexts": {},
    }
    for ctx in contexts:
        if ctx + new_tokens > cfg.max_seq_len:
            raise ValueError(f"context {ctx} + {new_tokens} new tokens exceeds max_seq_len={cfg.max_seq_len}")
        prompt = torch.randint(2, cfg.vocab_size, (ctx,), generator=torch.Generator().manual_seed(seed + ctx))
        tps: dict[str, list[float]] = {m: [] for m in METHODS}
        prefill: dict[str, list[float]] = {m: [] for m in METHODS}
        tokens: dict[str, list[int]] = {}
        for m in METHODS:  # warm-up (allocator, kernels), not timed
            tokens[m] = run_once(m, model, hf, prompt, min(new_tokens, 4))[2]
        for r in range(repeats):
            order = METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]
            for m in order:
                rate, pre, toks = run_once(m, model, hf, prompt, new_tokens)
                tps[m].append(rate)
                prefill[m].append(pre)
                tokens[m] = toks
        med = {m: statistics.median(v) for m, v in tps.items()}
        out["contexts"][str(ctx)] = {
            "decode_tokens_per_s": med,
            "runs_tokens_per_s": tps,
            "prefill_s": {m: statistics.median(v) for m, v in prefill.items()},
            "ratio_absorb_over_naive": med["dsv3lab_absorb"] / med["dsv3lab_naive"],
            "ratio_dsv3lab_over_transformers": med["dsv3lab_absorb"] / med["transformers"],
            "same_tokens": len({tuple(t) for t in tokens.values()}) == 1,  # in bf16 rounding may change a choice
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="toy")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and caches")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    args = p.parse_args(argv)
    result = benchmark(args.preset, tuple(args.contexts), args.new_tokens, args.repeats, args.threads, dtype=args.dtype)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
