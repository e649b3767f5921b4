"""Plots of post-training (DeepSeek-V3 §5): GRPO's rewards, accuracy and KL per step, and accuracy by stage.

Notebook: 13_post_training.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ._common import fig_ax
from .training import _smooth


def plot_grpo_curves(metrics: pd.DataFrame, val: pd.DataFrame | None = None, smooth: int = 5, axes=None) -> Figure:
    """Left: mean reward, correct and format share of the sampled completions per step (moving average over
    ``smooth`` steps, raw values faint) and, from ``val``, the greedy accuracy on held-out problems. Right: the KL
    estimate to the reference policy per step. ``metrics``/``val`` as ``train_grpo`` returns them."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    fig = axes[0].figure
    ax = axes[0]
    steps = metrics["step"].to_numpy() + 1
    for k, (col, label) in enumerate((("reward", "reward"), ("correct", "correct (sampled)"), ("format", "format"))):
        values = metrics[col].to_numpy(dtype=float)
        ax.plot(steps, values, color=f"C{k}", alpha=0.25, lw=0.8)
        ax.plot(steps, _smooth(values, smooth), color=f"C{k}", lw=1.8, label=label)
    if val is not None and len(val):
        ax.plot(val["step"], val["accuracy"], "ks--", ms=5, lw=1, label="held-out accuracy (greedy)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean over the step's samples")
    ax.set_title(f"rewards (moving average of {smooth} steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    axes[1].plot(steps, metrics["kl"].to_numpy(dtype=float), color="C3", lw=1.5)
    axes[1].set_xlabel("GRPO step")
    axes[1].set_ylabel("KL(π_θ ‖ π_ref), per token")
    axes[1].set_title("distance from the reference policy")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_stage_accuracy(table: pd.DataFrame, ax=None, title: str = "") -> Figure:
    """Grouped bars: one group per stage (rows of ``table``), one bar per column (e.g. greedy and sampled accuracy,
    format), values in [0, 1] written on the bars."""
    fig, ax = fig_ax(ax, (7, 3.5))
    n_rows, n_cols = table.shape
    width = 0.8 / n_cols
    x = np.arange(n_rows)
    for k, col in enumerate(table.columns):
        bars = ax.bar(x + (k - (n_cols - 1) / 2) * width, table[col].to_numpy(dtype=float), width, label=str(col))
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(x, [str(i) for i in table.index])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("share of held-out problems")
    ax.set_title(title or "accuracy by stage")
    ax.legend(fontsize=8, ncol=n_cols)
    return fig
