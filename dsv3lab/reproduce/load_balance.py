"""E1 ``load_balance``: no balancing vs the expert-level auxiliary loss vs the auxiliary-loss-free bias (with and
without the complementary sequence-wise loss) — validation loss, MaxVio, expert-load heatmaps, bias paths.

Paper: DeepSeek-V3 §2.1.2, §4.5.2 (Table 5), §4.5.3.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from ..train.experiments import RunCache
from ..train.metrics import moe_layer_ids, router_score_stats, tail_mean, val_acc, val_loss
from ..viz.training import plot_bias_trajectories, plot_curves, plot_load_heatmaps
from . import Context, Result, experiment
from ._common import VARIANTS, compare, fmt, mean_std, settings_line, variant_runs


def run_table(runs) -> pd.DataFrame:
    rows = []
    for (variant, seed), run in runs.items():
        final = run.final_val()
        rows.append(
            {
                "variant": variant,
                "seed": seed,
                "val_loss": val_loss(run),
                "val_acc": val_acc(run),
                "maxvio_batch": tail_mean(run, "maxvio_batch"),
                "maxvio_seq": tail_mean(run, "maxvio_seq"),
                "val_maxvio_batch": float(final.maxvio_batch.mean()),
                "steps": len(run.metrics),
                "tokens": int(run.metrics.tokens_seen.iloc[-1]),
            }
        )
    return pd.DataFrame(rows)


@experiment("load_balance", "E1: none vs aux loss vs aux-loss-free bias (± sequence-wise loss): loss, MaxVio, loads")
def run(ctx: Context) -> Result:
    runs = variant_runs(ctx)
    table = run_table(runs)
    table.to_csv(ctx.out / "load_balance.csv", index=False)
    curves = pd.concat(
        [
            r.metrics[["step", "loss_main", "maxvio_batch", "maxvio_seq"]].assign(variant=v, seed=s)
            for (v, s), r in runs.items()
        ]
    )
    curves.to_csv(ctx.out / "load_balance_curves.csv", index=False)
    val = pd.concat([r.val.assign(variant=v, seed=s) for (v, s), r in runs.items()])
    val_mean = val.groupby(["variant", "seed", "step"], sort=False).loss.mean().reset_index()

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    plot_curves(
        val_mean, "loss", ax=axes[0], ylabel="validation loss (mean over domains)", title="main-model validation loss"
    )
    smooth = max(1, len(next(iter(runs.values())).metrics) // 15)
    plot_curves(
        curves,
        "maxvio_batch",
        ax=axes[1],
        smooth=smooth,
        ylabel="MaxVio (global batch)",
        title=f"MaxVio of each step's batch (moving mean of {smooth})",
    )
    plot_curves(
        curves,
        "maxvio_seq",
        ax=axes[2],
        smooth=smooth,
        ylabel="MaxVio (per sequence, mean)",
        title="MaxVio within each sequence",
    )
    fig.tight_layout()
    fig.savefig(ctx.out / "load_balance_curves.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    seed0 = ctx.seeds[0]
    any_run = runs[(VARIANTS[0], seed0)]
    n_main = len(any_run.model.moe_layers(include_mtp=False))
    layers = moe_layer_ids(any_run.model)
    counts = {v: runs[(v, seed0)].loads["counts"][:, :n_main] for v in VARIANTS}
    fig = plot_load_heatmaps(counts, points=[0.1, 0.5, 1.0], layers=layers)
    fig.suptitle(
        f"relative expert load per MoE layer (seed {seed0}; each panel sums a window of 5% of the steps)", fontsize=10
    )
    fig.savefig(ctx.out / "load_heatmaps.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    biased = [v for v in VARIANTS if runs[(v, seed0)].train_cfg.bias_updated]
    fig, axes = plt.subplots(len(biased), n_main, figsize=(4.5 * n_main, 3 * len(biased)), squeeze=False)
    for r, v in enumerate(biased):
        for j in range(n_main):
            plot_bias_trajectories(
                runs[(v, seed0)].loads["bias"], layer=j, ax=axes[r, j], title=f"{v}: layer {layers[j]}"
            )
    fig.tight_layout()
    fig.savefig(ctx.out / "bias_trajectories.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    by = {v: table[table.variant == v] for v in VARIANTS}
    rows = "\n".join(
        f"| `{v}` | {fmt(by[v].val_loss)} | {fmt(by[v].val_acc)} | {fmt(by[v].maxvio_batch)} | "
        f"{fmt(by[v].maxvio_seq)} | {fmt(by[v].val_maxvio_batch)} |"
        for v in VARIANTS
    )
    vio_free, vio_none = by["aux_free"].maxvio_batch, by["none"].maxvio_batch
    balance_cmp = compare(vio_free, vio_none)
    quality_cmp = compare(by["aux_free"].val_loss, by["aux_loss"].val_loss)
    if balance_cmp == "lower":
        balance_verdict = (
            f"**reproduced**: the bias update alone lowers the batch MaxVio from "
            f"{vio_none.mean():.2f} (`none`) to {vio_free.mean():.2f} (`aux_free`), beyond seed noise"
        )
    elif balance_cmp == "one seed":
        balance_verdict = (
            f"one seed (`--fast`), no verdict: batch MaxVio `aux_free` {vio_free.mean():.2f} vs "
            f"`none` {vio_none.mean():.2f}"
        )
    else:
        balance_verdict = (
            f"**not reproduced at toy scale**: batch MaxVio `aux_free` {vio_free.mean():.2f} vs "
            f"`none` {vio_none.mean():.2f} ({balance_cmp})"
        )
    quality_verdict = {
        "lower": "**reproduced**: `aux_free` reaches a lower validation loss than `aux_loss` beyond seed noise",
        "within noise": (
            "**not resolved at toy scale**: the validation losses of `aux_free` and `aux_loss` differ by "
            "less than two standard errors over seeds"
        ),
        "one seed": "no verdict from one seed (`--fast`); the default run uses three",
        "higher": "**not reproduced at toy scale**: `aux_loss` reaches a lower validation loss than `aux_free`",
    }[quality_cmp]
    gamma, steps = any_run.train_cfg.bias_update_speed, any_run.train_cfg.steps
    train_s = float(sum(r.metrics.time_s.sum() for r in runs.values()))
    tok_s = float(pd.concat([r.metrics.tokens_per_s for r in runs.values()]).median())
    seq_above = sum(int(by[v].maxvio_seq.mean() > by[v].maxvio_batch.mean()) for v in VARIANTS)
    seq_ratio = ", ".join(f"`{v}` {by[v].maxvio_seq.mean() / by[v].maxvio_batch.mean():.1f}×" for v in VARIANTS)
    val_rows = RunCache(log=ctx.log).data(any_run.train_cfg).val
    probe = [router_score_stats(runs[("none", s)], torch.cat(list(val_rows.values()))) for s in ctx.seeds]
    stats = {k: float(np.mean([p[k] for p in probe])) for k in probe[0]}
    d_loss = mean_std(by["aux_loss"].val_loss)[0] - mean_std(by["aux_free"].val_loss)[0]
    report = f"""## E1 — Load balancing: auxiliary-loss-free bias vs auxiliary loss

**Paper** (§2.1.2, §4.5.2, Table 5): adding a per-expert bias b_i to the routing scores for top-K selection only, and
moving it by γ against each expert's load after every step, keeps the experts balanced without an auxiliary loss,
and the resulting models are better than those trained with an expert-level auxiliary loss (Pile BPB 0.727 → 0.724
small, 0.656 → 0.652 large). A sequence-wise loss with a tiny α = 1e-4 guards against extreme imbalance within one
sequence.

**Setup:** {settings_line(any_run)}. Seeds {ctx.seeds}; validation on held-out code / prose / math rows.
MaxVio = max load / mean load − 1 per MoE layer, averaged over the {n_main} main-model MoE layers; "batch" is over
each optimizer step's whole batch, "seq" over each sequence's own tokens (mean over sequences); both averaged over the
last 10% of steps. **γ = {gamma:g}** ({gamma / 1e-3:g}× the paper's 1e-3; a run here has {steps} steps, not ~10⁵) was
chosen from the router statistics of a short `none` probe run, before any variant was compared: the bias must be able
to cross the spread of the experts' mean affinities within a few dozen steps, while one step's ±γ stays well below
the typical gap between a token's K-th and (K+1)-th score. In this experiment's final `none` models (validation
rows, main-model routers) the spread is {stats["expert_mean_spread"]:.3f} and the gap {stats["topk_gap"]:.3f}.
The {len(runs)} runs took {train_s / 60:.1f} min of optimizer steps (median {tok_s:,.0f} tokens/s; runs are shared
through the run cache, so a rerun that finds them reports only the evaluation time below).

| variant | val loss | val acc | MaxVio batch | MaxVio seq | MaxVio val |
|---|---:|---:|---:|---:|---:|
{rows}

**Verdict.** Balance: {balance_verdict}. Quality: {quality_verdict} (`aux_loss` − `aux_free` = {d_loss:+.4f} nats;
the paper's gain is 0.003–0.004 BPB after 10¹¹–10¹² tokens, far below what {len(ctx.seeds)} toy run(s) of
{table.tokens.iloc[0] / 1e6:.2f}M tokens can resolve). Per-sequence MaxVio is above the batch MaxVio in
{seq_above}/{len(VARIANTS)} variants ({seq_ratio}): within one sequence of {any_run.train_cfg.seq_len} tokens the load
is less even than over the whole batch — the freedom that batch-wise balancing leaves (§4.5.3).

![validation loss and MaxVio](load_balance_curves.png)

![expert load heatmaps](load_heatmaps.png)

![bias trajectories](bias_trajectories.png)
"""
    summary = {
        "load_balance_router_stats": stats,
        "load_balance": {
            v: {
                "val_loss": mean_std(by[v].val_loss)[0],
                "val_loss_std": mean_std(by[v].val_loss)[1],
                "maxvio_batch": mean_std(by[v].maxvio_batch)[0],
                "maxvio_seq": mean_std(by[v].maxvio_seq)[0],
            }
            for v in VARIANTS
        },
    }
    files = [
        "load_balance.csv",
        "load_balance_curves.csv",
        "load_balance_curves.png",
        "load_heatmaps.png",
        "bias_trajectories.png",
    ]
    return Result(report, summary, files)
