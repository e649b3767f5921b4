"""Shared pieces of the training experiments: the suite's runs, per-run summaries, mean ± std formatting."""

from __future__ import annotations

import math

import numpy as np

from ..train.config import DEFAULT_AUX_LOSS_ALPHA, DEFAULT_SEQ_AUX_LOSS_ALPHA
from ..train.experiments import RunCache, suite_config
from ..train.trainer import RunResult
from . import Context

VARIANTS = ("none", "aux_loss", "aux_free", "aux_free_seq")


def variant_runs(ctx: Context, variants=VARIANTS) -> dict[tuple[str, int], RunResult]:
    """E1's runs: every balance variant for every seed (trained once, then loaded from the run cache)."""
    cache = RunCache(log=ctx.log)
    return {
        (v, seed): cache.run(suite_config(v, seed, ctx.fast, device=str(ctx.device)))
        for seed in ctx.seeds
        for v in variants
    }


def mean_std(values) -> tuple[float, float]:
    values = [float(v) for v in values]
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return mean, std


def fmt(values, digits: int = 3) -> str:
    """'mean ± std' over seeds ('mean' alone for one seed)."""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def compare(a, b) -> str:
    """How mean(a) - mean(b) relates to seed noise: 'lower', 'higher' or 'within noise' (2 standard errors of the
    difference), or 'one seed' when there is no spread to compare with."""
    ma, sa = mean_std(a)
    mb, sb = mean_std(b)
    if math.isnan(sa) or math.isnan(sb):
        return "one seed"
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    if abs(ma - mb) <= 2 * se:
        return "within noise"
    return "lower" if ma < mb else "higher"


def margin(a, b, unit: str = "") -> str:
    """The numbers behind :func:`compare`: the difference of the means and two standard errors of it, plus
    "marginal" when the difference clears the two-standard-error bar by less than half of it (three seeds cannot
    settle such a result)."""
    ma, sa = mean_std(a)
    mb, sb = mean_std(b)
    if math.isnan(sa) or math.isnan(sb):
        return f"difference {ma - mb:+.3f}{unit} (one seed)"
    two_se = 2 * math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    text = f"difference {ma - mb:+.3f}{unit}, two standard errors {two_se:.3f}{unit}"
    if two_se < abs(ma - mb) < 1.5 * two_se:
        text += "; marginal: a few more seeds could change the verdict"
    return text


def settings_line(run: RunResult) -> str:
    c = run.train_cfg
    m = run.model_cfg
    tokens = int(run.metrics.tokens_seen.iloc[-1]) if len(run.metrics) else 0
    return (
        f"`{c.preset}` preset ({m.n_layers} layers, {m.n_moe_layers} MoE, {m.n_routed_experts} routed experts "
        f"top-{m.n_activated_experts} in {m.n_expert_groups} groups (M = {m.n_limited_groups}), "
        f"{m.n_shared_experts} shared, d = {m.dim}, MTP D = {m.n_mtp}); {c.steps} optimizer steps of sequences "
        f"of {c.seq_len} tokens, batch ramp {c.effective_batch_size_start} → {c.batch_size} sequences "
        f"({tokens / 1e6:.2f}M tokens per run); AdamW peak lr {c.lr:g} with the paper's schedule shapes; "
        f"γ = {c.bias_update_speed:g} (0 for the last {1 - c.bias_freeze_frac:.1%} of steps); expert-level α = "
        f"{DEFAULT_AUX_LOSS_ALPHA:g} for `aux_loss`, sequence-wise α = {DEFAULT_SEQ_AUX_LOSS_ALPHA:g} for "
        "`aux_free_seq`"
    )
