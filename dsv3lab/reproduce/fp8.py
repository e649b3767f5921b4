"""E4 ``fp8``: FP8 training at toy scale — FP8 vs BF16 loss from the same seed and data, plus the two numerical
facts the recipe rests on (fine-grained scaling under outliers; accumulation precision and FP32 promotion).

Paper: DeepSeek-V3 §3.3 and Appendix B.1 (relative loss error of FP8 vs BF16 below 0.25%), §3.3.2 (≈ 2% maximum
relative error at K = 4096 with ~14-bit accumulation; promotion every N_C = 128 elements). Notebook: 07_fp8.

The BF16 baseline is the trainer's ``dtype="bf16"``: bf16 autocast of the forward pass with FP32 master weights,
FP32 gradients and FP32 AdamW moments. The FP8 run is the same plus ``fp8=True``: every projection GEMM the paper runs
in FP8 (MLA, dense MLP, shared and routed experts; Fprop, Dgrad and Wgrad) multiplies E4M3 operands with 1×128 /
128×128 scaling, emulated exactly on the CPU (quantize → dequantize → FP32 GEMM), with BF16 outputs under the same
autocast. Everything else is identical: initialisation (same seed), data order, schedules.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from ..fp8.accum import accumulation_sweep, accumulator_bits_sweep, promotion_interval_sweep
from ..fp8.compare import EMA_ALPHA, PAPER_THRESHOLD, loss_curves
from ..fp8.quant import outlier_scaling_demo
from ..model import build_model
from ..train.experiments import RunCache, suite_config
from ..train.metrics import val_loss
from ..utils import torch_threads
from ..viz.fp8 import (
    plot_accumulation_vs_bits,
    plot_accumulation_vs_k,
    plot_accumulation_vs_nc,
    plot_fp8_vs_bf16,
    plot_scaling_granularity,
)
from . import Context, Result, experiment
from ._common import fmt, mean_std, settings_line

EMA = EMA_ALPHA


def fp8_config(seed: int, fast: bool, fp8: bool, device: str = "cpu"):
    """The E4 run: the shared toy run of the suite, in bf16 autocast, shorter (FP8 emulation costs extra)."""
    changes = (
        dict(steps=20, seq_len=128, batch_size=4, micro_batch_size=4, eval_every=0)
        if fast
        else dict(steps=60, seq_len=128, batch_size=8, micro_batch_size=8, eval_every=0)
    )
    return suite_config("aux_free", seed, fast, device=device, dtype="bf16", model={"fp8": fp8}, **changes)


def same_weights_check(run, data, step: int) -> dict[str, float]:
    """Per-step fidelity, separated from trajectory divergence: at one set of weights (a trained BF16 run's) and one
    batch, the FP8 model's loss, gradient and expert choices against the BF16 model's (both under bf16 autocast)."""
    tokens, targets = data.batch(step, run.train_cfg.batch_size)
    out = {}
    for fp8 in (False, True):
        model = build_model(run.model_cfg.replace(fp8=fp8), device=run.model.embed.weight.device)
        model.load_state_dict(run.model.state_dict())
        model.train()
        with torch.autocast(model.embed.weight.device.type, dtype=torch.bfloat16):
            _, losses = model(tokens, targets)
        losses["total"].backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()
        chosen = [moe.last_indices.sort(-1).values for moe in model.moe_layers(include_mtp=False)]
        out[fp8] = (float(losses["main"].detach()), grad, chosen)
    (l_bf16, g_bf16, c_bf16), (l_fp8, g_fp8, c_fp8) = out[False], out[True]
    flips = float(torch.stack([(a != b).any(-1).float().mean() for a, b in zip(c_bf16, c_fp8)]).mean())
    cos = float(g_fp8 @ g_bf16 / (g_fp8.norm() * g_bf16.norm()))
    return {
        "loss_rel_diff": abs(l_fp8 - l_bf16) / l_bf16,
        "grad_cosine": cos,
        "grad_rel_error": float((g_fp8 - g_bf16).norm() / g_bf16.norm()),
        "routing_flips": flips,
    }


@experiment("fp8", "E4: FP8 vs BF16 training loss; fine-grained scaling; accumulation precision")
def run(ctx: Context) -> Result:
    # 1) numerics, seconds: fine-grained scaling under outliers, accumulation precision
    scaling = outlier_scaling_demo()
    scaling.to_csv(ctx.out / "fp8_scaling.csv", index=False)
    if ctx.fast:
        ks, n_cs, bit_counts = (256, 1024, 4096), (32, 128, 512, 4096), (13, 14, 15, 16, 20)
    else:
        ks, n_cs, bit_counts = (
            (256, 512, 1024, 2048, 4096, 8192),
            (32, 64, 128, 256, 512, 1024, 2048, 4096),
            (12, 13, 14, 15, 16, 18, 20, 24),
        )
    accum = accumulation_sweep(ks=ks, seeds=tuple(ctx.seeds))
    n_c = pd.concat([promotion_interval_sweep(n_cs, dist=d) for d in ("positive", "normal")], ignore_index=True)
    bits = accumulator_bits_sweep(bit_counts)
    accum.to_csv(ctx.out / "fp8_accumulation.csv", index=False)
    n_c.to_csv(ctx.out / "fp8_promotion_interval.csv", index=False)
    bits.to_csv(ctx.out / "fp8_accumulator_bits.csv", index=False)
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.2))
    plot_scaling_granularity(scaling, ax=axes[0])
    plot_accumulation_vs_k(accum, ax=axes[1])
    plot_accumulation_vs_nc(n_c, metric="norm_rel_error", ax=axes[2])
    plot_accumulation_vs_bits(bits, ax=axes[3])
    fig.tight_layout()
    fig.savefig(ctx.out / "fp8_numerics.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    # 2) training: BF16 vs FP8 from the same seed and data
    cache = RunCache(log=ctx.log)
    curves, runs = [], {}
    with torch_threads(1):
        for seed in ctx.seeds:
            for fp8 in (False, True):
                runs[(fp8, seed)] = cache.run(fp8_config(seed, ctx.fast, fp8, device=str(ctx.device)))
            curves.append(loss_curves(runs[(False, seed)].metrics, runs[(True, seed)].metrics, seed))
    curves = pd.concat(curves, ignore_index=True)
    curves.to_csv(ctx.out / "fp8_training.csv", index=False)
    fig = plot_fp8_vs_bf16(curves, threshold=PAPER_THRESHOLD)
    fig.savefig(ctx.out / "fp8_training.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    per_seed = curves.groupby("seed").agg(final=("rel_diff", "last"), max=("rel_diff", "max"))
    with torch_threads(1):
        fidelity = pd.DataFrame(
            [
                {
                    "seed": s,
                    **same_weights_check(
                        runs[(False, s)], cache.data(runs[(False, s)].train_cfg), runs[(False, s)].train_cfg.steps - 1
                    ),
                }
                for s in ctx.seeds
            ]
        )
    fidelity.to_csv(ctx.out / "fp8_same_weights.csv", index=False)
    evals = pd.DataFrame(
        [{"seed": s, "val_bf16": val_loss(runs[(False, s)]), "val_fp8": val_loss(runs[(True, s)])} for s in ctx.seeds]
    )
    evals["rel_diff"] = (evals.val_fp8 - evals.val_bf16).abs() / evals.val_bf16
    final_bf16 = curves.groupby("seed").loss_bf16.last()
    seed_spread = float(final_bf16.std(ddof=1) / final_bf16.mean()) if len(final_bf16) > 1 else float("nan")
    speed = curves.time_fp8_s.median() / curves.time_bf16_s.median()

    # 3) the verdicts
    final_mean = mean_std(per_seed["final"])[0]
    max_mean = mean_std(per_seed["max"])[0]
    if final_mean < PAPER_THRESHOLD and evals.rel_diff.max() < PAPER_THRESHOLD:
        verdict = (
            f"**reproduced at toy scale**: the smoothed training loss of the FP8 run ends within "
            f"{100 * final_mean:.2f}% of the BF16 run (mean over seeds) and the final validation losses within "
            f"{100 * evals.rel_diff.max():.2f}%, below the paper's 0.25%"
        )
    else:
        verdict = (
            f"**not reproduced at toy scale**: the FP8 run's final smoothed loss differs from BF16 by "
            f"{100 * final_mean:.2f}% (validation: up to {100 * evals.rel_diff.max():.2f}%), above the paper's "
            "0.25%"
        )
    if not np.isnan(seed_spread):
        verdict += (
            f". For scale: BF16 runs from different seeds end {100 * seed_spread:.2f}% apart (std/mean of the "
            "final smoothed loss)"
        )
    verdict += (
        f". Per step the FP8 loss is close — at identical weights it differs by "
        f"{100 * fidelity.loss_rel_diff.mean():.3f}% — but {100 * fidelity.routing_flips.mean():.1f}% of "
        f"tokens choose a different expert set and the gradient's cosine with BF16's is "
        f"{fidelity.grad_cosine.mean():.3f}: the perturbation is amplified by discrete routing and accumulates "
        "over the run. Whether the gap shrinks with model and batch size (where the paper measured) is not "
        "something this toy run can show"
    )
    pos = accum[accum.dist == "positive"].groupby(["K", "promotion"]).max_rel_error.mean()
    nrm = accum[accum.dist == "normal"].groupby(["K", "promotion"]).norm_rel_error.mean()
    k_top = 4096
    no_promo, promo = pos.loc[(k_top, "none")], pos.loc[(k_top, "every 128")]
    b = bits[bits.promotion == "none"].set_index("acc_bits").max_rel_error
    tile = scaling[scaling.granularity == "1×128 tile"].set_index("magnitude")
    tensor = scaling[scaling.granularity == "per tensor"].set_index("magnitude")
    m_top = float(scaling.magnitude.max())
    any_run = runs[(True, ctx.seeds[0])]

    report = f"""## E4 — FP8 training: FP8 vs BF16, fine-grained scaling, accumulation precision

**Paper** (§3.3, App. B.1): DeepSeek-V3 trains with every Linear GEMM (Fprop, Dgrad, Wgrad) in FP8 E4M3, activations
scaled per 1×128 tile and weights per 128×128 block, partial sums promoted to FP32 every N_C = 128 elements; the
relative loss error against BF16 stays **below 0.25%** (16B and 230B models, up to 1.33T tokens). Without promotion,
the ~14-bit accumulation of H800 tensor cores gives a maximum relative error of **nearly 2%** at K = 4096.

**Setup (training):** {settings_line(any_run)}. BF16 = bf16 autocast of the forward pass, FP32 master weights,
gradients and AdamW moments. FP8 = the same with `fp8=true`: the projections' three GEMMs take E4M3 operands
(1×128 activation / gradient tiles, 128×128 weight blocks; Wgrad operands 128×1 along tokens), emulated exactly on
the CPU. Same seed (initialisation) and same data order for both runs of a pair. **rel_loss_diff**, precisely: per
optimizer step t, |L̃_fp8(t) − L̃_bf16(t)| / L̃_bf16(t), where L̃ is the main next-token training loss smoothed by an
exponential moving average (α = {EMA}, started at the first step); "final" is its value at the last step, "max" the
largest over all steps; both are averaged over seeds. Validation: the same ratio for the token-weighted validation
loss of the final models.

| measure | value (mean ± std over seeds {ctx.seeds}) |
|---|---:|
| rel_loss_diff, final step | {fmt(100 * per_seed["final"], 3)} % |
| rel_loss_diff, max over steps | {fmt(100 * per_seed["max"], 3)} % |
| validation loss BF16 / FP8 | {fmt(evals.val_bf16)} / {fmt(evals.val_fp8)} |
| validation rel. difference | {fmt(100 * evals.rel_diff, 3)} % |
| same weights, one batch: loss rel. difference | {fmt(100 * fidelity.loss_rel_diff, 3)} % |
| same weights, one batch: gradient cosine FP8 vs BF16 | {fmt(fidelity.grad_cosine, 4)} |
| same weights, one batch: tokens whose expert set differs | {fmt(100 * fidelity.routing_flips, 1)} % |
| step time FP8 emulation / BF16 (CPU) | {speed:.2f}× |

The "same weights" rows separate the per-step numerical error from the divergence of the trajectories: at the final
weights of each BF16 run, on its last training batch, the FP8 model's loss, gradient and expert choices (main-model
MoE layers) are compared with the BF16 model's. Routing is discrete: a token whose top-K scores are nearly tied
changes experts under a tiny perturbation, and its gradient then changes as a whole — when such a token dominates a
small batch's gradient, the cosine drops far below what the per-GEMM error (≈ 4%) would give.

**Verdict:** {verdict}. This is a {any_run.metrics.tokens_seen.iloc[-1] / 1e6:.2f}M-token run of a
{any_run.model_cfg.dim}-wide model, not the paper's 1T-token runs: it checks that the recipe does not derail training
at the start, not that it holds over a full pre-training run.

![FP8 vs BF16 training](fp8_training.png)

**Fine-grained scaling** (`dsv3lab.fp8.quant.outlier_scaling_demo`: 256 tokens × 1024 channels, 4 outlier channels
× magnitude): error of the ordinary channels at magnitude {m_top:g}: per tensor
{100 * tensor.loc[m_top, "rel_error_typical"]:.1f}% ({100 * tensor.loc[m_top, "flushed_to_zero"]:.1f}% of values
flushed to zero) vs 1×128 tiles {100 * tile.loc[m_top, "rel_error_typical"]:.1f}%
({100 * tile.loc[m_top, "flushed_to_zero"]:.1f}% flushed); without outliers every granularity has E4M3's
{100 * tile.loc[1.0, "rel_error_typical"]:.1f}%. **Reproduced:** fine-grained scaling confines an outlier's
damage to its tile.

**Accumulation precision** (`dsv3lab.fp8.accum`: 32 × 32 outputs of E4M3 operands; products of one 32-wide MMA
aligned to the largest exponent and truncated to 14 bits; exact fp64 reference): at K = {k_top}, without promotion
the maximum relative error is **{100 * no_promo:.1f}%** for same-sign operands (|N(0,1)|; every product adds to the
running sum) and the normwise error {100 * nrm.loc[(k_top, "none")]:.2f}% for zero-mean operands; promoting to FP32
every 128 elements brings it to {100 * promo:.3f}% ({100 * nrm.loc[(k_top, "every 128")]:.3f}% normwise), flat in K.
**Partly reproduced:** the effect and the fix are reproduced; the size depends on the input distribution and on the
bit count, which the paper gives only as "about 14 bits": the same model gives {100 * b.loc[15]:.1f}% with 15 bits and
{100 * b.loc[16]:.1f}% with 16 (the paper's "nearly 2%" lies in this range).

![FP8 numerics: scaling, accumulation vs K, vs N_C, vs bits](fp8_numerics.png)
"""
    summary = {
        "fp8": {
            "rel_loss_diff_final": float(final_mean),
            "rel_loss_diff_max": float(max_mean),
            "rel_loss_diff_final_std": float(mean_std(per_seed["final"])[1]),
            "val_rel_loss_diff": float(evals.rel_diff.mean()),
            "bf16_seed_spread": seed_spread,
            "same_weights_loss_rel_diff": float(fidelity.loss_rel_diff.mean()),
            "same_weights_grad_cosine": float(fidelity.grad_cosine.mean()),
            "same_weights_routing_flips": float(fidelity.routing_flips.mean()),
            "fp8_step_time_ratio": float(speed),
            "accumulation_k4096_max_rel_error": {"no_promotion": float(no_promo), "promotion_every_128": float(promo)},
            "scaling_typical_rel_error_at_max_outlier": {
                "per_tensor": float(tensor.loc[m_top, "rel_error_typical"]),
                "tile_1x128": float(tile.loc[m_top, "rel_error_typical"]),
            },
        }
    }
    files = [
        "fp8_training.csv",
        "fp8_training.png",
        "fp8_same_weights.csv",
        "fp8_scaling.csv",
        "fp8_accumulation.csv",
        "fp8_promotion_interval.csv",
        "fp8_accumulator_bits.csv",
        "fp8_numerics.png",
    ]
    return Result(report, summary, files)
