"""FP8 GEMM speed on a GPU: dsv3lab's block-scaled Triton kernel vs torch._scaled_mm vs a BF16 matmul.

    python benchmarks/fp8_gemm.py [--reps 50] [--shapes all|headline]

Shapes are DeepSeek-V3's (M tokens × N outputs × K inputs): the DeepGEMM headline 4096×7168×16384 (the ``wo``
projection's K), the MLA projections, the dense MLP and the expert GEMMs, plus one grouped expert GEMM. Each case
runs the candidates alternately (A, B, C, A, B, C, …) in one process and reports median milliseconds, TFLOP/s and
the ratio to BF16; the Triton output is also checked against the dequantized reference on the same GPU.

Prints one JSON object. Without a CUDA GPU it prints an explanation to stderr and exits with status 2 (the README
records the GPU numbers as pending until someone runs this on one).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys

import torch

SHAPES = {  # name: (M, N, K)
    "headline 4096x7168x16384 (wo-like, DeepGEMM's largest)": (4096, 7168, 16384),
    "MLA wq_b 1536->24576": (4096, 24576, 1536),
    "MLA wkv_a 7168->576": (4096, 576, 7168),
    "MLA wkv_b 512->32768": (4096, 32768, 512),
    "MLA wo 16384->7168": (4096, 7168, 16384),
    "dense w1/w3 7168->18432": (4096, 18432, 7168),
    "dense w2 18432->7168": (4096, 7168, 18432),
    "expert w1/w3 7168->2048": (4096, 2048, 7168),
    "expert w2 2048->7168": (4096, 7168, 2048),
}
GROUPED = {"grouped experts: 8 x 512 tokens, 7168->4096": (8, 512, 4096, 7168)}  # (groups, tokens each, N, K)


def no_gpu_exit() -> int:
    print(
        "benchmarks/fp8_gemm.py: no CUDA GPU found. This benchmark measures FP8 tensor-core GEMMs (compute "
        "capability >= 8.9, e.g. H100/H800/L40S/RTX 4090) and has nothing to measure on a CPU; the README's FP8 GPU "
        "numbers stay 'pending a GPU run' until `python benchmarks/fp8_gemm.py` is run on one.",
        file=sys.stderr,
    )
    return 2


def timed(fn) -> float:
    """Milliseconds of one call, measured with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def bench_case(candidates: dict, flops: float, reps: int, warmup: int = 5) -> dict:
    for fn in candidates.values():  # warm up (Triton autotuning happens here)
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(reps):  # alternate the candidates
        for name, fn in candidates.items():
            times[name].append(timed(fn))
    out = {}
    for name, ts in times.items():
        ms = statistics.median(ts)
        out[name] = {"median_ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
    if "bf16 matmul" in out:
        for name in out:
            out[name]["speedup_vs_bf16"] = round(out["bf16 matmul"]["median_ms"] / out[name]["median_ms"], 3)
    return out


def dense_case(name: str, m: int, n: int, k: int, reps: int) -> dict:
    """One M×N×K GEMM: the Triton kernel (with and without quantizing the activations), torch._scaled_mm, BF16."""
    from dsv3lab.fp8.kernels import act_quant, fp8_gemm
    from dsv3lab.fp8.quant import BLOCK2D, TILE, quantize

    dev = torch.device("cuda")
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    xq, xs = act_quant(x)
    wq = quantize(w.float(), BLOCK2D)
    w8, ws = wq.data.contiguous(), wq.scale.contiguous()
    ref = quantize(x.float(), TILE).dequantize() @ wq.dequantize().t()
    got = fp8_gemm(xq, xs, w8, ws).float()
    rel_err = ((got - ref).norm() / ref.norm()).item()
    candidates = {
        "triton block-scaled fp8_gemm": lambda: fp8_gemm(xq, xs, w8, ws),
        "triton act_quant + fp8_gemm": lambda: fp8_gemm(*act_quant(x), w8, ws),
        "bf16 matmul": lambda: x @ w.t(),
    }
    # torch._scaled_mm with row-wise scales (one per token, one per output channel): the closest cuBLAS FP8 GEMM
    a_row = x.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / 448
    b_row = w.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / 448
    a8 = (x.float() / a_row).to(torch.float8_e4m3fn)
    b8 = (w.float() / b_row).to(torch.float8_e4m3fn)

    def scaled_mm():
        return torch._scaled_mm(a8, b8.t(), a_row, b_row.t(), out_dtype=torch.bfloat16)

    note = "row-wise scales (scale_a [M,1], scale_b [1,N])"
    try:
        scaled_mm()
        candidates["torch._scaled_mm rowwise"] = scaled_mm
    except Exception as err:
        note = f"unavailable: {type(err).__name__}: {err}"[:300]
    return {
        "case": name,
        "M": m,
        "N": n,
        "K": k,
        "triton_rel_error_vs_reference": rel_err,
        "scaled_mm": note,
        **bench_case(candidates, 2.0 * m * n * k, reps),
    }


def grouped_case(name: str, g: int, t: int, n: int, k: int, reps: int) -> dict:
    """g experts with t tokens each: the grouped Triton kernel vs a batched BF16 matmul."""
    from dsv3lab.fp8.kernels import act_quant, fp8_grouped_gemm
    from dsv3lab.fp8.quant import BLOCK2D, quantize

    dev = torch.device("cuda")
    xs = torch.randn(g * t, k, device=dev, dtype=torch.bfloat16)
    wg = torch.randn(g, n, k, device=dev, dtype=torch.bfloat16) * 0.02
    xq, xsc = act_quant(xs)
    wgq = quantize(wg.float(), BLOCK2D)
    offs = torch.arange(1, g + 1, device=dev, dtype=torch.int32) * t
    candidates = {
        "triton fp8_grouped_gemm": lambda: fp8_grouped_gemm(xq, xsc, wgq.data, wgq.scale, offs),
        "bf16 matmul": lambda: torch.bmm(xs.view(g, t, k), wg.transpose(1, 2)),
    }
    return {
        "case": name,
        "groups": g,
        "tokens_per_group": t,
        "N": n,
        "K": k,
        **bench_case(candidates, 2.0 * g * t * n * k, reps),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--shapes", choices=["all", "headline"], default="all")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        return no_gpu_exit()
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        print(
            f"benchmarks/fp8_gemm.py: GPU {torch.cuda.get_device_name()} has compute capability {cap}; FP8 tensor "
            "cores need >= 8.9",
            file=sys.stderr,
        )
        return 2
    import triton

    torch.manual_seed(0)
    shapes = SHAPES if args.shapes == "all" else dict(list(SHAPES.items())[:1])
    results = []
    for name, (m, n, k) in shapes.items():
        results.append(dense_case(name, m, n, k, args.reps))
        print(json.dumps(results[-1]), file=sys.stderr)
    if args.shapes == "all":
        for name, (g, t, n, k) in GROUPED.items():
            results.append(grouped_case(name, g, t, n, k, args.reps))
    print(
        json.dumps(
            {
                "benchmark": "fp8_gemm",
                "command": "python benchmarks/fp8_gemm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "gpu": torch.cuda.get_device_name(),
                "capability": list(cap),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "triton": triton.__version__,
                "python": platform.python_version(),
                "reps": args.reps,
                "results": results,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
