"""Figures about the architecture: preset sizes, KV cache per token, RoPE/YaRN frequencies, group-limited routing.

Every function takes data (a DataFrame, a config, tensors) and an optional matplotlib ``ax`` and returns the Figure.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from ..accounting import kv_cache_comparison
from ..config import ModelConfig
from ..model.rope import linear_ramp, rope_frequencies, yarn_correction_range
from ._common import fig_ax


def plot_kv_cache(kv: pd.DataFrame, ax=None) -> Figure:
    """Grouped bars, log scale: KV-cache bytes per token for each attention variant (columns preset, variant,
    bytes_per_token)."""
    fig, ax = fig_ax(ax, (9, 4.5))
    presets = list(dict.fromkeys(kv["preset"]))
    variants = list(dict.fromkeys(kv["variant"]))
    width = 0.8 / len(variants)
    x = np.arange(len(presets))
    for j, variant in enumerate(variants):
        vals = [kv[(kv.preset == p) & (kv.variant == variant)].bytes_per_token.iloc[0] for p in presets]
        bars = ax.bar(x + (j - (len(variants) - 1) / 2) * width, vals, width, label=variant)
        if variant.startswith("MLA"):
            for b, v in zip(bars, vals):
                ax.annotate(_human_bytes(v), (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(x, presets)
    ax.set_ylabel("KV-cache bytes per token (BF16, all layers)")
    ax.set_title("KV cache per token: MLA latent vs MHA / GQA / MQA with the same heads")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def plot_params(table: pd.DataFrame, ax=None) -> Figure:
    """Total vs activated vs MTP parameters per preset (log scale). Columns: preset, total_params, activated_params,
    mtp_params."""
    fig, ax = fig_ax(ax, (8, 4))
    x = np.arange(len(table))
    for j, (col, label) in enumerate(
        [("total_params", "total"), ("activated_params", "activated per token"), ("mtp_params", "MTP modules")]
    ):
        ax.bar(x + (j - 1) * 0.27, table[col].clip(lower=1), 0.27, label=label)
    ax.set_yscale("log")
    ax.set_xticks(x, table["preset"])
    ax.set_ylabel("parameters")
    ax.set_title("Parameters per preset (main model; MTP separately)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return fig


# The attention variants MLA is compared with: each its own colour and line style (MHA and MQA were once alike).
BASELINE_STYLES = {"MHA": dict(color="C1", ls="--"), "GQA": dict(color="C2", ls="-."), "MQA": dict(color="C3", ls=":")}


def plot_kv_vs_rank(cfg: ModelConfig, ranks: list[int] | None = None, gqa_groups: int = 8, ax=None) -> Figure:
    """KV bytes per token as the latent rank d_c varies, against MHA/GQA/MQA lines for ``cfg``'s heads."""
    fig, ax = fig_ax(ax)
    ranks = ranks or [2**i for i in range(4, 12)]
    mla = [kv_cache_comparison(cfg.replace(kv_lora_rank=r), gqa_groups)["MLA (latent)"] for r in ranks]
    ax.plot(ranks, mla, "o-", label="MLA latent (d_c + d_h^R)")
    for name, value in kv_cache_comparison(cfg, gqa_groups).items():
        if name in BASELINE_STYLES:
            ax.axhline(value, lw=1.2, label=name, **BASELINE_STYLES[name])
    ax.axvline(cfg.kv_lora_rank, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("kv_lora_rank d_c")
    ax.set_ylabel("bytes per token (BF16, all layers)")
    ax.set_title(f"{cfg.name}: latent rank vs cache size")
    ax.legend(fontsize=8)
    return fig


def plot_rope_frequencies(cfg: ModelConfig, ax=None) -> Figure:
    """Wavelength (2π/θ_i) per rotary pair, plain RoPE vs YaRN, with the original context and the ramp bounds."""
    fig, ax = fig_ax(ax)
    plain = rope_frequencies(cfg.replace(max_seq_len=cfg.original_seq_len))
    yarn_cfg = cfg if cfg.yarn_enabled else cfg.replace(max_seq_len=cfg.original_seq_len * 4, rope_factor=4.0)
    yarn = rope_frequencies(yarn_cfg)
    i = np.arange(len(plain))
    ax.semilogy(i, 2 * math.pi / plain.numpy(), "o-", ms=3, label="RoPE")
    ax.semilogy(i, 2 * math.pi / yarn.numpy(), "s-", ms=3, label=f"YaRN (s={yarn_cfg.rope_factor:g})")
    ax.axhline(cfg.original_seq_len, color="gray", ls="--", lw=1, label="original context")
    low, high = yarn_correction_range(yarn_cfg)
    ax.axvspan(low, high, color="C2", alpha=0.15, label=f"ramp [{low}, {high}]")
    ax.set_xlabel("rotary pair index i")
    ax.set_ylabel("wavelength 2π/θ_i (tokens)")
    ax.set_title("YaRN keeps short wavelengths, stretches long ones by s")
    ax.legend(fontsize=8)
    return fig


def plot_yarn_ramp(cfg: ModelConfig, ax=None) -> Figure:
    """The blend factor per rotary pair: 1 = keep the frequency (extrapolate), 0 = divide it by s (interpolate)."""
    fig, ax = fig_ax(ax, (6, 3))
    low, high = yarn_correction_range(cfg)
    smooth = 1 - linear_ramp(low, high, cfg.qk_rope_head_dim // 2)
    ax.step(np.arange(len(smooth)), smooth.numpy(), where="mid")
    ax.set_xlabel("rotary pair index i")
    ax.set_ylabel("share of the original frequency")
    ax.set_title(f"YaRN ramp: low={low}, high={high}")
    return fig


def plot_yarn(cfg: ModelConfig, axes=None) -> Figure:
    """Two panels for one YaRN setting: the wavelength of every rotary pair, plain RoPE vs YaRN
    (:func:`plot_rope_frequencies`), and the ramp γ_i between ``low`` and ``high`` (:func:`plot_yarn_ramp`).
    ``axes``: two matplotlib axes, or None for a new figure."""
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), width_ratios=(3, 2), layout="constrained")
    fig = axes[0].figure
    plot_rope_frequencies(cfg, ax=axes[0])
    plot_yarn_ramp(cfg, ax=axes[1])
    return fig


def plot_group_routing(
    indices: torch.Tensor,
    n_experts: int,
    n_groups: int,
    kept_groups: torch.Tensor | None = None,
    ax=None,
    max_tokens: int = 32,
) -> Figure:
    """Tokens × experts: chosen experts as dots, kept groups shaded, group boundaries as lines.

    indices: [T, K] chosen experts; kept_groups: [T, M] group ids that survived group-limited routing (optional).
    """
    fig, ax = fig_ax(ax, (8, 4))
    t = min(indices.shape[0], max_tokens)
    per_group = n_experts // n_groups
    grid = np.zeros((t, n_experts))
    if kept_groups is not None:
        for row in range(t):
            for g in kept_groups[row].tolist():
                grid[row, g * per_group : (g + 1) * per_group] = 0.35
    for row in range(t):
        grid[row, indices[row].tolist()] = 1.0
    ax.imshow(grid, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    for g in range(1, n_groups):
        ax.axvline(g * per_group - 0.5, color="k", lw=0.8)
    ax.set_xlabel("expert (groups separated by lines)")
    ax.set_ylabel("token")
    ax.set_title("Group-limited routing: chosen experts (dark) inside the kept groups (light)")
    return fig


def plot_gate_scores(scores: dict[str, torch.Tensor], top_k: int, ax=None) -> Figure:
    """Affinity by rank: for each scoring function (name -> [T, E] scores), the mean over tokens of the sorted
    affinities, with the top-K region shaded. Softmax affinities compete (they sum to 1 over the experts); sigmoid
    affinities are independent numbers in (0, 1)."""
    fig, ax = fig_ax(ax, (7, 3.5))
    n_experts = None
    for name, s in scores.items():
        ranked = s.detach().float().sort(dim=-1, descending=True).values  # [T, E]
        n_experts = ranked.shape[-1]
        mean = ranked.mean(0).numpy()
        lo, hi = np.quantile(ranked.numpy(), [0.1, 0.9], axis=0)
        ranks = np.arange(1, n_experts + 1)
        ax.plot(ranks, mean, "o-", ms=3, label=f"{name} (sum over experts ≈ {ranked.sum(-1).mean():.2f})")
        ax.fill_between(ranks, lo, hi, alpha=0.2)
    ax.axvspan(0.5, top_k + 0.5, color="gray", alpha=0.12, label=f"top-{top_k}")
    ax.set_xlim(0.5, (n_experts or 1) + 0.5)
    ax.set_xlabel("expert rank for the token (1 = highest affinity)")
    ax.set_ylabel("affinity s_i (mean, 10–90% band)")
    ax.set_title("Sigmoid vs softmax affinities")
    ax.legend(fontsize=8)
    return fig


def plot_expert_counts(counts: dict[str, torch.Tensor | np.ndarray | list], n_groups: int = 1, ax=None) -> Figure:
    """Tokens per expert for each label (grouped bars), the balanced load as a dashed line, group boundaries."""
    fig, ax = fig_ax(ax, (8, 3.5))
    arrays = {k: np.asarray(torch.as_tensor(v).cpu(), dtype=float) for k, v in counts.items()}
    n = len(next(iter(arrays.values())))
    width = 0.8 / len(arrays)
    x = np.arange(n)
    for j, (label, values) in enumerate(arrays.items()):
        ax.bar(x + (j - (len(arrays) - 1) / 2) * width, values, width, label=label)
    ax.axhline(next(iter(arrays.values())).mean(), color="k", ls="--", lw=1, label="balanced")
    per_group = n // n_groups
    for g in range(1, n_groups):
        ax.axvline(g * per_group - 0.5, color="gray", lw=0.8)
    ax.set_xticks(x)
    ax.set_xlabel("expert" + (" (groups separated by lines)" if n_groups > 1 else ""))
    ax.set_ylabel("tokens routed")
    ax.legend(fontsize=8)
    return fig
