"""Figures about inference: the KV cache per token and the context it buys, decode cost per path, speculative decoding
acceptance.

Every function takes data (a DataFrame or a list) and an optional matplotlib ``ax`` and returns the Figure.
Notebook: 10_inference.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ._common import fig_ax, finish


def plot_max_context(table: pd.DataFrame, ax=None) -> Figure:
    """Longest context whose KV cache fits a budget, latent vs materialised K/V, per preset (log scale).

    Columns: preset, max_context_latent, max_context_materialized (and optionally budget_bytes for the title)."""
    fig, ax = fig_ax(ax, (8, 4))
    x = np.arange(len(table))
    ax.bar(x - 0.2, table["max_context_latent"], 0.4, label="latent cache (absorbed MLA)")
    ax.bar(x + 0.2, table["max_context_materialized"], 0.4, label="per-head K/V (naive MLA)")
    for i, (lat, mat) in enumerate(zip(table["max_context_latent"], table["max_context_materialized"])):
        ax.annotate(f"{lat / mat:.0f}x", (i, lat), ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(x, table["preset"])
    ax.set_ylabel("tokens that fit")
    budget = table["budget_bytes"].iloc[0] if "budget_bytes" in table else None
    ax.set_title("Longest context in a KV-cache budget" + (f" of {budget / 1e9:.0f} GB (BF16)" if budget else ""))
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_attention_cost(table: pd.DataFrame, value: str = "macs", ax=None) -> Figure:
    """A cost of one decode step (or prefill) vs context length, one line per path.

    Columns: context, path, and ``value`` (e.g. ``macs`` from ``accounting.mla_attention_macs`` or measured ``ms``)."""
    fig, ax = fig_ax(ax)
    for path, group in table.groupby("path", sort=False):
        group = group.sort_values("context")
        ax.plot(group["context"], group[value], marker="o", label=path)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    return finish(ax, "context length t (cached tokens)", value)


def plot_acceptance(accepted_per_round: list[int] | np.ndarray, depth: int, ax=None) -> Figure:
    """Histogram of drafts accepted per speculative round (0 … depth): each round yields accepted + 1 tokens."""
    fig, ax = fig_ax(ax, (5, 3.5))
    counts = np.bincount(np.asarray(accepted_per_round, dtype=int), minlength=depth + 1)
    share = counts / max(counts.sum(), 1)
    ax.bar(np.arange(depth + 1), share, color="tab:green")
    for k, v in enumerate(share):
        ax.annotate(f"{v:.0%}", (k, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(np.arange(depth + 1), [f"{k} ({k + 1} tok)" for k in range(depth + 1)])
    ax.set_xlabel("drafts accepted in a round (tokens per main-model forward)")
    ax.set_ylabel("share of rounds")
    mean = float(np.mean(accepted_per_round)) if len(accepted_per_round) else 0.0
    ax.set_title(f"MTP speculative decoding: {mean + 1:.2f} tokens per forward")
    ax.set_ylim(0, 1.1)
    return fig


def plot_acceptance_over_training(table: pd.DataFrame, ax=None) -> Figure:
    """Draft acceptance rate (left axis) and tokens per main-model forward (right axis) as training proceeds.

    Columns: step, acceptance_rate, tokens_per_forward."""
    fig, ax = fig_ax(ax)
    ax.plot(table["step"], table["acceptance_rate"], marker="o", color="tab:green", label="acceptance rate")
    ax.set_xlabel("training step")
    ax.set_ylabel("acceptance rate of MTP drafts")
    ax.set_ylim(0, 1)
    ax.axhspan(0.85, 0.90, color="tab:green", alpha=0.12, label="paper: 85-90% (§5.4.3)")
    right = ax.twinx()
    right.plot(table["step"], table["tokens_per_forward"], marker="s", color="tab:purple", label="tokens / forward")
    right.set_ylabel("tokens per main-model forward")
    right.set_ylim(1, max(2.0, float(table["tokens_per_forward"].max()) + 0.1))
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return fig
