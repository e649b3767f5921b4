"""Figures about FP8 (DeepSeek-V3 §3.3): the number grids, fine-grained scaling under outliers, accumulation
precision, and FP8 vs BF16 training curves.

Every function takes data (a format name, a DataFrame from :mod:`dsv3lab.fp8` or the ``fp8`` experiment) and an
optional matplotlib ``ax`` and returns the Figure.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from ..fp8.formats import fp8_format, fp8_grid
from ..fp8.quant import quantize
from ._common import fig_ax


def plot_fp8_grid(formats: tuple[str, ...] = ("e4m3", "e5m2"), ax=None) -> Figure:
    """Relative spacing (gap to the next value / value) of every positive value, log-log: a saw-tooth between
    2^-m and 2^-(m-1) in the normal range, growing in the subnormals; range limits marked."""
    fig, ax = fig_ax(ax, (8, 4))
    for i, name in enumerate(formats):
        fmt = fp8_format(name)
        g = fp8_grid(name, positive=True).double().numpy()
        rel = np.diff(g) / g[:-1]
        ax.loglog(
            g[:-1],
            rel,
            ".",
            ms=4,
            color=f"C{i}",
            label=f"{name.upper()}: {fmt.mantissa_bits} mantissa bits, max {fmt.max:g}",
        )
        ax.axvline(fmt.min_normal, color=f"C{i}", ls=":", lw=1)
        ax.axvline(fmt.max, color=f"C{i}", ls="--", lw=1)
        ax.axvline(fmt.min_subnormal, color=f"C{i}", ls="-.", lw=1)
    ax.set_xlabel("value (positive grid points)")
    ax.set_ylabel("gap to next value / value")
    ax.set_title(
        "FP8 grids: relative spacing between neighbours\n(dash-dot: smallest subnormal, dotted: smallest "
        "normal, dashed: max)",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return fig


def plot_fp8_number_line(fmt: str = "e4m3", lo: float = 0.0, hi: float = 16.0, ax=None) -> Figure:
    """The representable values in [lo, hi] as ticks on a linear axis: equal spacing inside a binade, doubling from
    one binade to the next."""
    fig, ax = fig_ax(ax, (9, 1.8))
    g = fp8_grid(fmt).numpy()
    g = g[(g >= lo) & (g <= hi)]
    ax.vlines(g, 0, 1, lw=1)
    ax.set_yticks([])
    ax.set_xlim(lo, hi)
    ax.set_title(f"{fmt.upper()} values in [{lo:g}, {hi:g}] ({len(g)} of them)")
    return fig


def plot_scaling_granularity(df: pd.DataFrame, metric: str = "rel_error_typical", ax=None) -> Figure:
    """Quantization error vs outlier magnitude, one line per granularity (``outlier_scaling_demo`` output)."""
    fig, ax = fig_ax(ax)
    labels = {
        "rel_error_typical": "relative error on the ordinary channels",
        "flushed_to_zero": "share of non-zero values flushed to 0",
        "rel_error": "relative error (all values)",
        "snr_db": "SNR (dB)",
    }
    for i, (name, part) in enumerate(df.groupby("granularity", sort=False)):
        ax.plot(part["magnitude"], part[metric], "o-", color=f"C{i}", label=name)
    ax.set_xscale("log")
    if metric != "snr_db":
        ax.set_yscale("symlog", linthresh=1e-3) if (df[metric] == 0).any() else ax.set_yscale("log")
    ax.set_xlabel("outlier channels' magnitude (× the other channels)")
    ax.set_ylabel(labels.get(metric, metric))
    ax.set_title("E4M3 quantization of activations with outlier channels")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return fig


def plot_tile_scales(x: torch.Tensor, block, ax=None, title: str | None = None) -> Figure:
    """log2 of the scale each element of x [tokens, channels] gets at granularity ``block``: outliers are visible as
    the tiles/blocks/rows whose scale they inflate."""
    fig, ax = fig_ax(ax, (7, 3.5))
    s = quantize(x, block).expanded_scale()
    im = ax.imshow(torch.log2(s).numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="log2(scale)")
    ax.set_xlabel("channel")
    ax.set_ylabel("token")
    ax.set_title(title or f"scales per {block if block else 'tensor'}")
    return fig


def _error_axes(ax, xlabel: str, metric: str, title: str, log2_x: bool = True) -> None:
    """The shared finish of the accumulation-error plots: log axes, labels, legend, grid."""
    if log2_x:
        ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")


def plot_accumulation_vs_k(
    df: pd.DataFrame, metric: str = "max_rel_error", dist: str = "positive", paper: float | None = 0.02, ax=None
) -> Figure:
    """GEMM error vs K for the limited accumulator, with and without promotion (``accumulation_sweep`` output)."""
    fig, ax = fig_ax(ax)
    d = df[df["dist"] == dist]
    for i, (label, part) in enumerate(d.groupby("promotion", sort=False)):
        agg = part.groupby("K")[metric].agg(["mean", "min", "max"])
        ax.plot(agg.index, agg["mean"], "o-", color=f"C{i}", label=f"promotion: {label}")
        if len(part["seed"].unique()) > 1:
            ax.fill_between(agg.index, agg["min"], agg["max"], color=f"C{i}", alpha=0.2)
    if paper is not None:
        ax.plot([4096], [paper], "r*", ms=12, label="paper: ~2% at K = 4096 (no promotion)")
    bits = int(d["acc_bits"].iloc[0]) if len(d) else "?"
    _error_axes(ax, "K (inner dimension)", metric, f"{bits}-bit accumulation of E4M3 products ({dist} inputs)")
    return fig


def plot_accumulation_vs_nc(df: pd.DataFrame, metric: str = "max_rel_error", ax=None) -> Figure:
    """GEMM error at fixed K vs the promotion interval N_C (``promotion_interval_sweep`` output)."""
    fig, ax = fig_ax(ax, (6, 4))
    for i, (dist, part) in enumerate(df.groupby("dist", sort=False)):
        ax.plot(part["N_C"], part[metric], "o-", color=f"C{i}", label=f"{dist} inputs")
    ax.axvline(128, color="gray", ls="--", lw=1, label="N_C = 128 (paper)")
    _error_axes(
        ax,
        "promotion interval N_C (K elements per FP32 promotion)",
        metric,
        f"K = {int(df['K'].iloc[0])}: promoting more often bounds the error",
    )
    return fig


def plot_accumulation_vs_bits(
    df: pd.DataFrame, metric: str = "max_rel_error", paper: float | None = 0.02, ax=None
) -> Figure:
    """GEMM error at fixed K vs the accumulator's bits, with and without promotion (``accumulator_bits_sweep``)."""
    fig, ax = fig_ax(ax, (6, 4))
    for i, (label, part) in enumerate(df.groupby("promotion", sort=False)):
        ax.plot(part["acc_bits"], part[metric], "o-", color=f"C{i}", label=f"promotion: {label}")
    if paper is not None:
        ax.axhline(paper, color="r", ls="--", lw=1, label="paper: ~2% (K = 4096, 14 bits, no promotion)")
    ax.axvline(14, color="gray", ls=":", lw=1)
    _error_axes(
        ax,
        "accumulator bits kept when adding",
        metric,
        f"K = {int(df['K'].iloc[0])}: error vs accumulator precision",
        log2_x=False,
    )
    return fig


def plot_fp8_vs_bf16(curves: pd.DataFrame, ax=None, threshold: float = 0.0025) -> Figure:
    """FP8 vs BF16 training: smoothed loss per step for both (mean over seeds; top) and the relative difference
    (bottom, with the paper's 0.25% line). ``curves``: columns step, seed, loss_bf16, loss_fp8, rel_diff."""
    if ax is None:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(2, 1))
    else:
        fig, top, bottom = ax.figure, ax, None
    mean = curves.groupby("step").mean(numeric_only=True)
    top.plot(mean.index, mean["loss_bf16"], label="BF16 (autocast)")
    top.plot(mean.index, mean["loss_fp8"], "--", label="FP8 GEMMs (E4M3, 1×128 / 128×128)")
    top.set_ylabel("training loss (EMA)")
    top.legend()
    top.grid(alpha=0.3)
    top.set_title("FP8 vs BF16 training, same seed and data")
    if bottom is not None:
        for seed, part in curves.groupby("seed"):
            bottom.plot(part["step"], 100 * part["rel_diff"], lw=0.8, alpha=0.6, label=f"seed {seed}")
        bottom.axhline(100 * threshold, color="r", ls="--", lw=1, label="paper: < 0.25%")
        bottom.set_ylabel("|L_fp8 − L_bf16| / L_bf16 (%)")
        bottom.set_xlabel("step")
        bottom.legend(fontsize=7, ncol=4)
        bottom.grid(alpha=0.3)
    else:
        top.set_xlabel("step")
    return fig
