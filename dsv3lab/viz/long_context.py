"""Plots of a context extension (DeepSeek-V3 §4.3): how each method rescales the RoPE frequencies, the loss per
position beyond the original context, and the needle-in-a-haystack grid (the analog of Fig. 8).

Notebook: 12_long_context.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure

from ..config import ModelConfig
from ..model.rope import rope_frequencies
from ._common import fig_ax

# red (0) -> yellow -> green (1), as the paper's Fig. 8 scores retrieval
NEEDLE_CMAP = LinearSegmentedColormap.from_list("needle", ["#d73027", "#fee08b", "#1a9850"])


def plot_rope_scaling(cfgs: dict[str, ModelConfig], ax=None) -> Figure:
    """θ'_i / θ_i per rotary pair for each config against plain RoPE (its own config at ``max_seq_len =
    original_seq_len``): 1 keeps a frequency, 1/s interpolates it."""
    fig, ax = fig_ax(ax, (6, 3.5))
    for k, (label, cfg) in enumerate(cfgs.items()):
        plain = rope_frequencies(cfg.replace(max_seq_len=cfg.original_seq_len))
        ratio = (rope_frequencies(cfg) / plain).numpy()
        ax.plot(np.arange(len(ratio)), ratio, "o-", ms=4, lw=1.4, label=label, color=f"C{k}")
    ax.set_xlabel("rotary pair index i (high frequency → low)")
    ax.set_ylabel("θ'_i / θ_i")
    ax.set_yscale("log", base=2)
    ax.set_title("frequency scaling per rotary pair")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1:
        return values
    kernel = np.ones(window) / window
    return np.convolve(np.pad(values, (window // 2, window - 1 - window // 2), mode="edge"), kernel, mode="valid")


def plot_loss_by_position(
    curves: dict[str, torch.Tensor | np.ndarray], original_seq_len: int, smooth: int = 8, ax=None, title: str = ""
) -> Figure:
    """Next-token loss per position (a moving average over ``smooth`` positions), one line per model; the original
    training context is shaded."""
    fig, ax = fig_ax(ax, (7, 3.5))
    for k, (label, values) in enumerate(curves.items()):
        v = np.asarray(values.detach().cpu() if torch.is_tensor(values) else values, dtype=float)
        ax.plot(np.arange(len(v)), _moving_average(v, smooth), lw=1.5, label=label, color=f"C{k}")
    ax.axvspan(0, original_seq_len, color="0.85", alpha=0.5, lw=0, label=f"trained context ({original_seq_len})")
    ax.set_xlabel("position")
    ax.set_ylabel(f"loss (nats, mean of {smooth} positions)" if smooth > 1 else "loss (nats)")
    ax.set_title(title or "loss per position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_needle_grid(grid: pd.DataFrame, ax=None, title: str = "", annotate: bool = True) -> Figure:
    """Retrieval accuracy by context length (x) and needle depth (y) from ``needle_grid``'s DataFrame."""
    fig, ax = fig_ax(ax, (5, 3.2))
    table = grid.pivot_table(index="depth", columns="length", values="accuracy")  # [depths, lengths]
    im = ax.imshow(table.to_numpy(), cmap=NEEDLE_CMAP, vmin=0, vmax=1, aspect="auto", origin="upper")
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns])
    ax.set_yticks(range(table.shape[0]), [f"{d:.0%}" for d in table.index])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    if annotate:
        for (r, c), value in np.ndenumerate(table.to_numpy()):
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(title or "needle in a haystack")
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03, label="accuracy")
    return fig
