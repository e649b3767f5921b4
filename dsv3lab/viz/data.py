"""Figures about the data pipeline (§4.1): tokens per domain, document lengths, a FIM example, packed rows.

Every function takes data (dicts, DataFrames, token ids, tensors) and an optional matplotlib ``ax`` and returns the
Figure. Typical inputs come from ``dsv3lab.data``: ``Datasets.num_tokens()``, ``documents_table(docs, tokenizer)``,
``apply_fim(...)`` and ``Datasets.train`` / ``Datasets.train_domains``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from ._common import fig_ax

_PART_COLORS = {"prefix": "C0", "suffix": "C2", "middle": "C1", "special": "0.35"}


def plot_tokens_per_domain(num_tokens: dict, ax=None) -> Figure:
    """Bars per domain: training and validation tokens (documents with bos/eos, before FIM and packing), annotated
    with each domain's share of the training tokens. ``num_tokens`` is ``Datasets.num_tokens()``."""
    fig, ax = fig_ax(ax, (7, 4))
    by = num_tokens["by_domain"]
    domains = list(by)
    train = np.array([by[d]["train_tokens"] for d in domains], dtype=float)
    val = np.array([by[d]["val_tokens"] for d in domains], dtype=float)
    x = np.arange(len(domains))
    bars = ax.bar(x - 0.2, train, 0.4, label="train")
    ax.bar(x + 0.2, val, 0.4, label="val")
    for b, v in zip(bars, train):
        ax.annotate(
            f"{v / 1e3:,.0f}K ({v / train.sum():.0%})",
            (b.get_x() + b.get_width() / 2, v),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(x, domains)
    ax.set_ylabel("tokens")
    ax.set_title(f"Tokens per domain ({train.sum() / 1e6:.2f}M train, {val.sum() / 1e3:,.0f}K val)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_doc_lengths(table: pd.DataFrame, column: str = "tokens", bins: int = 40, ax=None) -> Figure:
    """Histogram of document lengths per domain on log-spaced bins. ``table`` has columns ``domain`` and ``column``
    (``documents_table(docs, tokenizer)`` gives ``chars`` and ``tokens``)."""
    fig, ax = fig_ax(ax, (7, 4))
    lengths = table[column].clip(lower=1)
    edges = np.logspace(0, np.log10(max(lengths.max(), 2)) + 0.05, bins)
    for domain, group in table.groupby("domain", sort=False):
        ax.hist(group[column].clip(lower=1), bins=edges, alpha=0.55, label=f"{domain} (n={len(group)})")
    ax.set_xscale("log")
    ax.set_xlabel(f"document length ({column})")
    ax.set_ylabel("documents")
    ax.set_title("Document lengths per domain")
    ax.legend()
    return fig


def fim_parts(ids: Sequence[int], tokenizer) -> list[tuple[str, list[int]]]:
    """Split a wrapped document into labelled parts in stream order: ("special", [id]) and ("prefix" | "suffix" |
    "middle" | "document", ids)."""
    ids = list(ids)
    marks = {tokenizer.fim_prefix_id: "prefix", tokenizer.fim_suffix_id: "suffix", tokenizer.fim_middle_id: "middle"}
    parts: list[tuple[str, list[int]]] = []
    current = "document"
    for i in ids:
        if i in tokenizer.special_ids:
            parts.append(("special", [i]))
            current = marks.get(i, current)
        elif parts and parts[-1][0] == current:
            parts[-1][1].append(i)
        else:
            parts.append((current, [i]))
    return parts


def plot_fim_example(ids: Sequence[int], tokenizer, max_chars: int = 200, ax=None) -> Figure:
    """One FIM document (PSM): the token strip in training order, coloured prefix / suffix / middle with the special
    tokens in grey, and the decoded text of each part below it (long parts are shortened in the middle)."""
    fig, ax = fig_ax(ax, (10, 4.2))
    parts = fim_parts(ids, tokenizer)
    total = sum(len(p) for _, p in parts)
    short = {
        tokenizer.bos_id: "bos",
        tokenizer.eos_id: "eos",
        tokenizer.pad_id: "pad",
        tokenizer.fim_prefix_id: "fim_begin",
        tokenizer.fim_suffix_id: "fim_hole",
        tokenizer.fim_middle_id: "fim_end",
    }
    pos, n_special = 0, 0
    for label, part in parts:
        color = _PART_COLORS.get(label, "C7")
        ax.barh(1.0, len(part), left=pos, height=0.35, color=color, edgecolor="white", linewidth=0.5)
        if label == "special":
            ax.annotate(
                short.get(part[0], "?"),
                (pos + 0.5, 1.18),
                xytext=(0, 6 + 9 * (n_special % 2)),
                textcoords="offset points",
                ha="center",
                fontsize=7,
                arrowprops={"arrowstyle": "-", "lw": 0.5},
            )
            n_special += 1
        elif len(part) > 0.08 * total:
            ax.text(pos + len(part) / 2, 1.0, f"{label} ({len(part)})", ha="center", va="center", fontsize=8)
        pos += len(part)
    y = 0.6
    for label, part in parts:
        if label == "special":
            continue
        text = tokenizer.decode(part)
        if len(text) > max_chars:
            text = text[: max_chars // 2] + " … " + text[-max_chars // 2 :]
        text = text.replace("\n", "⏎").replace("$", r"\$")
        lines = textwrap.wrap(f"{label}: {text}", width=110, max_lines=2, placeholder=" …", drop_whitespace=False)
        ax.text(
            0,
            y,
            "\n".join(lines),
            fontsize=7.5,
            family="monospace",
            color=_PART_COLORS.get(label, "k"),
            va="top",
            transform=ax.get_yaxis_transform(),
        )
        y -= 0.25
    ax.set_xlim(0, max(total, 1))
    ax.set_ylim(y - 0.05, 1.5)
    ax.set_yticks([])
    ax.set_xlabel("token position in the training stream")
    kind = "PSM: <fim_begin> prefix <fim_hole> suffix <fim_end> middle" if len(parts) > 3 else "plain document"
    ax.set_title(f"Fill-in-the-middle, {kind}")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    return fig


def plot_packing(
    tokens: torch.Tensor, domain_ids: torch.Tensor, domains: Sequence[str], bos_id: int, max_rows: int = 24, ax=None
) -> Figure:
    """Packed rows ``[R, T+1]`` coloured by the domain of each token, with a tick where a document starts (bos).
    No attention mask separates documents: a row may hold the end of one and the start of the next (§4.1)."""
    fig, ax = fig_ax(ax, (10, 4))
    tokens, domain_ids = tokens[:max_rows], domain_ids[:max_rows].long()
    cmap = ListedColormap([plt.get_cmap("tab10")(i) for i in range(len(domains))])
    ax.imshow(domain_ids.numpy(), aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(domains) - 0.5, interpolation="nearest")
    r, c = torch.nonzero(tokens == bos_id, as_tuple=True)
    ax.scatter(c.numpy(), r.numpy(), marker="|", s=60, color="k", label="bos (document start)")
    for i, d in enumerate(domains):
        ax.bar(0, 0, color=cmap(i), label=d)
    ax.set_xlabel("position in row (T + 1 tokens)")
    ax.set_ylabel("row")
    ax.set_title("Packed training rows: documents back to back, no cross-document mask")
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    return fig
