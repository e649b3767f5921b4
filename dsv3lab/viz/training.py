"""Figures about training: schedules, loss and MaxVio curves, expert-load heatmaps, bias paths, domain loads, MTP.

Every function takes data (DataFrames from :mod:`dsv3lab.train`, arrays from ``loads.npz``) and an optional
matplotlib ``ax`` (or ``axes``) and returns the Figure. Notebooks 04–06 and ``dsv3lab reproduce`` use the same
functions; widgets wrap them.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from ._common import fig_ax

VARIANT_COLORS = {
    "none": "tab:gray",
    "aux_loss": "tab:orange",
    "aux_free": "tab:blue",
    "aux_free_seq": "tab:green",
    "D=0": "tab:gray",
    "D=1": "tab:purple",
}


def plot_schedules(table: pd.DataFrame, axes=None) -> Figure:
    """The four schedules of a run (``schedule_table``): learning rate, batch size, MTP λ, bias speed γ."""
    if axes is None:
        fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    fig = axes[0].figure
    panels = [
        ("lr", "learning rate"),
        ("batch_size", "sequences per step"),
        ("mtp_lambda", "MTP weight λ"),
        ("gamma", "bias update speed γ"),
    ]
    for ax, (col, label) in zip(axes, panels):
        ax.plot(table["frac"], table[col], lw=1.8)
        ax.set_title(label)
        ax.set_xlabel("fraction of the run")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    return fig


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def plot_curves(
    df: pd.DataFrame,
    y: str,
    x: str = "step",
    by: str = "variant",
    ax=None,
    smooth: int = 1,
    ylabel: str | None = None,
    title: str | None = None,
) -> Figure:
    """Mean ± std over seeds of column ``y`` against ``x``, one line per value of ``by`` (long DataFrame with an
    optional ``seed`` column)."""
    fig, ax = fig_ax(ax)
    for label, g in df.groupby(by, sort=False):
        seeds = g.groupby(x)[y]
        mean, std = seeds.mean(), seeds.std().fillna(0.0)
        xs, m = mean.index.to_numpy(), _smooth(mean.to_numpy(), smooth)
        s = _smooth(std.to_numpy(), smooth)
        color = VARIANT_COLORS.get(str(label))
        ax.plot(xs, m, label=str(label), color=color, lw=1.6, marker="o" if len(xs) <= 12 else None, ms=4)
        if (s > 0).any():
            ax.fill_between(xs, m - s, m + s, color=color, alpha=0.15, lw=0)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_live_loss(metrics: pd.DataFrame, val: pd.DataFrame | None = None, ax=None) -> Figure:
    """Training loss per step (main and MTP depths) and, when given, validation loss per domain."""
    fig, ax = fig_ax(ax, (7, 3.5))
    ax.plot(metrics["step"], metrics["loss_main"], lw=1, label="train main")
    for col in [c for c in metrics.columns if c.startswith("loss_mtp_")]:
        ax.plot(metrics["step"], metrics[col], lw=1, alpha=0.7, label=f"train {col[5:]}")
    if val is not None and len(val):
        for domain, g in val.groupby("domain", sort=False):
            ax.plot(g["step"] - 1, g["loss"], "o--", ms=4, label=f"val {domain}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def relative_load_norm(vmax: float = 4.0) -> TwoSlopeNorm:
    """The colour scale of every relative-load heatmap (with the diverging ``RdBu_r``): 0 (idle) blue, 1 (balanced)
    white, ``vmax`` (N_r / K_r: every token picks the expert) red — centred at 1, not at the middle of [0, vmax]."""
    if not vmax > 1:
        raise ValueError(f"vmax must be > 1 (a relative load of 1 is balanced), got {vmax}")
    return TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=vmax)


def plot_load_heatmap(
    load: np.ndarray, ax=None, title: str = "", layers: list[int] | None = None, vmax: float = 4.0
) -> Figure:
    """Relative expert load [layers, experts] (1 = balanced; N_r / K_r = all tokens) as a heatmap centred at 1."""
    fig, ax = fig_ax(ax, (6, 2.5))
    im = ax.imshow(load, aspect="auto", cmap="RdBu_r", norm=relative_load_norm(vmax), interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(load.shape[0]), [str(i) for i in (layers or range(load.shape[0]))])
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="relative load")
    return fig


def relative_load_window(counts: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Relative load [layers, experts] of the summed counts of steps [start, stop) (``loads.npz`` counts)."""
    c = counts[start:stop].sum(axis=0).astype(np.float64)
    return c / np.maximum(c.mean(axis=-1, keepdims=True), 1e-12)


def plot_load_heatmaps(
    counts: dict[str, np.ndarray],
    points: list[float],
    window: float = 0.05,
    layers: list[int] | None = None,
    vmax: float = 4.0,
) -> Figure:
    """A grid: one row per variant, one column per point of training (fractions of the run), each the relative
    load per layer and expert summed over a window of ``window`` of the run around that point; colours centred at a
    relative load of 1 (:func:`relative_load_norm`)."""
    fig, axes = plt.subplots(
        len(counts), len(points), figsize=(3.3 * len(points), 1.7 * len(counts) + 0.6), squeeze=False
    )
    for r, (variant, c) in enumerate(counts.items()):
        n = c.shape[0]
        w = max(1, int(window * n))
        for j, p in enumerate(points):
            stop = min(n, max(w, int(round(p * n))))
            load = relative_load_window(c, stop - w, stop)
            ax = axes[r, j]
            im = ax.imshow(load, aspect="auto", cmap="RdBu_r", norm=relative_load_norm(vmax), interpolation="nearest")
            ax.set_yticks(range(load.shape[0]), [str(i) for i in (layers or range(load.shape[0]))], fontsize=7)
            ax.set_xticks([])
            if r == 0:
                ax.set_title(f"steps {stop - w}–{stop - 1}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{variant}\nlayer", fontsize=9)
            if r == len(counts) - 1:
                ax.set_xlabel("expert", fontsize=8)
    fig.colorbar(im, ax=axes, fraction=0.02, pad=0.01, label="relative load (1 = balanced)")
    return fig


def plot_bias_trajectories(bias: np.ndarray, layer: int = 0, ax=None, title: str | None = None) -> Figure:
    """The selection bias b_i of every expert of one MoE layer against the optimizer step (``loads.npz`` bias)."""
    fig, ax = fig_ax(ax, (6, 3.2))
    steps = np.arange(bias.shape[0])
    for e in range(bias.shape[2]):
        ax.plot(steps, bias[:, layer, e], lw=1)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("bias $b_i$")
    ax.set_title(title or f"selection bias per expert, MoE layer {layer}", fontsize=9)
    ax.grid(alpha=0.3)
    return fig


def plot_bias_update(
    counts: np.ndarray, bias: np.ndarray, gamma: float | None = None, rule: str = "sign", axes=None
) -> Figure:
    """The auxiliary-loss-free bias update of one MoE layer step by step (§2.1.2): MaxVio of each step's load (left)
    and the selection bias b_i of every expert (right). ``counts`` [steps, E] tokens per expert and ``bias`` [steps, E]
    the bias after each step (``dsv3lab.balance.simulate_bias_update``, or one layer of ``loads.npz``)."""
    counts, bias = np.asarray(counts, dtype=np.float64), np.asarray(bias, dtype=np.float64)
    if counts.ndim != 2 or counts.shape != bias.shape:
        raise ValueError(f"counts and bias must both be [steps, experts], got {counts.shape} and {bias.shape}")
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.2), layout="constrained")
    fig = axes[0].figure
    maxvio = counts.max(axis=-1) / np.maximum(counts.mean(axis=-1), 1e-12) - 1  # as dsv3lab.balance.max_violation
    setting = ("" if gamma is None else f"γ = {gamma:g}, ") + f"rule {rule}"
    axes[0].plot(maxvio, lw=1)
    axes[0].set(xlabel="step", ylabel="MaxVio", ylim=(0, None))
    axes[0].set_title(f"load imbalance of each step ({setting})", fontsize=9)
    axes[0].grid(alpha=0.3)
    plot_bias_trajectories(
        bias[:, None], layer=0, ax=axes[1], title=f"bias per expert; at the end Σ b_i = {bias[-1].sum():+.3f}"
    )
    return fig


def plot_load_step(
    counts: np.ndarray, bias: np.ndarray, step: int, layer: int = 0, window: int = 5, name: str = ""
) -> Figure:
    """One step of a run, as notebook 04's scrubber shows it: the relative load of every MoE layer summed over the
    ``window`` steps up to ``step`` (left), and the selection bias of MoE layer ``layer`` over the whole run with
    ``step`` marked (right). ``counts`` and ``bias`` are ``loads.npz`` arrays [steps, layers, experts]. Constrained
    layout keeps the colorbar's label clear of the right panel's ticks."""
    if not 0 <= step < counts.shape[0]:
        raise ValueError(f"step must be in [0, {counts.shape[0] - 1}], got {step}")
    if not 0 <= layer < bias.shape[1]:
        raise ValueError(f"layer must be in [0, {bias.shape[1] - 1}], got {layer}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    start = max(0, step - window + 1)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.2), layout="constrained")
    prefix = f"{name}: " if name else ""
    plot_load_heatmap(
        relative_load_window(counts, start, step + 1), ax=axes[0], title=f"{prefix}relative load, steps {start}-{step}"
    )
    plot_bias_trajectories(bias, layer=layer, ax=axes[1], title=f"{prefix}bias of MoE layer {layer}")
    axes[1].axvline(step, color="k", ls="--", lw=0.8)
    return fig


def plot_domain_load(expert_load: pd.DataFrame, layer: int, ax=None, title: str = "", vmax: float = 4.0) -> Figure:
    """Fig. 9: relative expert load per domain (rows) and expert (columns) in one layer (``expert_load.csv`` rows of
    one evaluation), colours centred at 1 (:func:`relative_load_norm`)."""
    fig, ax = fig_ax(ax, (6, 1.8))
    g = expert_load[expert_load.layer == layer]
    table = g.pivot_table(index="domain", columns="expert", values="relative_load", sort=False)
    im = ax.imshow(
        table.to_numpy(), aspect="auto", cmap="RdBu_r", norm=relative_load_norm(vmax), interpolation="nearest"
    )
    ax.set_yticks(range(len(table.index)), list(table.index), fontsize=8)
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], fontsize=6)
    ax.set_xlabel("expert", fontsize=8)
    ax.set_title(title or f"layer {layer}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="relative load")
    return fig


def plot_domain_bars(
    table: pd.DataFrame, value: str, by: str = "variant", ax=None, ylabel: str | None = None, title: str | None = None
) -> Figure:
    """Grouped bars of ``value`` per domain, one bar per ``by`` value, with ±std over seeds as error bars."""
    fig, ax = fig_ax(ax, (6, 3.2))
    agg = table.groupby([by, "domain"], sort=False)[value].agg(["mean", "std"]).reset_index()
    labels = list(dict.fromkeys(agg[by]))
    domains = list(dict.fromkeys(agg["domain"]))
    width = 0.8 / len(labels)
    x = np.arange(len(domains))
    for j, label in enumerate(labels):
        g = agg[agg[by] == label].set_index("domain").reindex(domains)
        ax.bar(
            x + (j - (len(labels) - 1) / 2) * width,
            g["mean"],
            width,
            yerr=g["std"].fillna(0),
            capsize=3,
            label=str(label),
            color=VARIANT_COLORS.get(str(label)),
        )
    ax.set_xticks(x, domains)
    ax.set_ylabel(ylabel or value)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_mtp_chain(n_tokens: int = 6, depth: int = 2, ax=None) -> Figure:
    """The causal chain of MTP (§2.2, Fig. 3): row k = depth k; at position i, depth k combines h_i^{k-1} (arrow from
    the row below) with Emb(t_{i+k}) and predicts t_{i+k+1}; depth k has T − k positions."""
    fig, ax = fig_ax(ax, (1.5 * n_tokens + 1, 1.2 * (depth + 1) + 1.2))
    for k in range(depth + 1):
        for i in range(n_tokens - k):
            x, y = i * 1.5, k * 1.2
            name = "main" if k == 0 else f"MTP {k}"
            ax.add_patch(plt.Rectangle((x, y), 1.2, 0.7, fc="tab:blue" if k == 0 else "tab:purple", alpha=0.25))
            ax.text(x + 0.6, y + 0.45, f"{name}\n→ t{i + k + 2}", ha="center", va="center", fontsize=8)
            if k == 0:
                ax.text(x + 0.6, y - 0.25, f"t{i + 1}", ha="center", va="center", fontsize=8)
            else:
                ax.annotate("", (x + 0.6, y), (x + 0.6, y - 0.5), arrowprops=dict(arrowstyle="->", lw=0.8))
                ax.text(
                    x + 1.05, y - 0.25, f"Emb(t{i + k + 1})", ha="left", va="center", fontsize=6.5, color="tab:green"
                )
            if i > 0:
                ax.annotate(
                    "", (x, y + 0.35), (x - 0.3, y + 0.35), arrowprops=dict(arrowstyle="->", lw=0.5, color="gray")
                )
    ax.set_xlim(-0.3, 1.5 * n_tokens)
    ax.set_ylim(-0.6, 1.2 * (depth + 1))
    ax.axis("off")
    ax.set_title(
        f"Multi-token prediction, D = {depth}: depth k at position i predicts t(i+k+1); gray arrows: causal "
        "attention within a depth",
        fontsize=9,
    )
    return fig
