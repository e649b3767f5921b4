"""Figures of measured numbers from the notebooks: losses over training steps, and grouped bars of timings or
counts (one bar per variant within each case).

Every function takes a DataFrame and an optional matplotlib ``ax`` and returns the Figure.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ._common import fig_ax


def plot_step_losses(df: pd.DataFrame, x: str = "step", ax=None, title: str = "Training loss") -> Figure:
    """One line per loss column (every column except ``x``) against ``x``."""
    fig, ax = fig_ax(ax, (7, 3.5))
    for col in df.columns:
        if col != x:
            ax.plot(df[x], df[col], label=col)
    ax.set_xlabel(x)
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_bars(
    df: pd.DataFrame,
    x: str,
    hue: str,
    y: str,
    ax=None,
    log: bool = False,
    ylabel: str | None = None,
    title: str | None = None,
    annotate: bool = True,
) -> Figure:
    """Grouped bars: one group per value of ``x``, one bar per value of ``hue``, height ``y``."""
    fig, ax = fig_ax(ax, (7, 3.5))
    cases = list(dict.fromkeys(df[x]))
    hues = list(dict.fromkeys(df[hue]))
    width = 0.8 / len(hues)
    pos = np.arange(len(cases))
    for j, h in enumerate(hues):
        vals = [
            float(df[(df[x] == c) & (df[hue] == h)][y].iloc[0]) if ((df[x] == c) & (df[hue] == h)).any() else np.nan
            for c in cases
        ]
        bars = ax.bar(pos + (j - (len(hues) - 1) / 2) * width, vals, width, label=str(h))
        if annotate:
            for b, v in zip(bars, vals):
                if np.isfinite(v):
                    ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.set_xticks(pos, [str(c) for c in cases])
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig
