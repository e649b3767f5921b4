"""Figures about expert parallelism: all-to-all volumes, one token's traffic over nodes and GPUs, nodes per token,
expert loads mapped onto nodes, EPLB placements, GPU balance before/after rebalancing, and how a plan ages.

Pure functions ``plot_x(data, ax=None) -> Figure`` over tensors and DataFrames from :mod:`dsv3lab.parallel`
(``traffic``, ``eplb``, ``expert``). Notebook 09_expert_parallel and experiment ``expert_parallel`` use them; the
widget ``dsv3lab.viz.widgets.eplb_explorer`` wraps :func:`plot_gpu_loads`.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle

from ..parallel.eplb import gpu_loads, imbalance, replica_loads
from ..parallel.traffic import Topology
from ._common import fig_ax, finish

POLICY_COLORS = {"before": "tab:gray", "hierarchical": "tab:blue", "global": "tab:orange"}


def plot_all_to_all(rows: np.ndarray, ax=None, title: str = "rows dispatched") -> Figure:
    """rows [src rank, dst rank]: how many token rows each rank sends to each rank in one dispatch."""
    fig, ax = fig_ax(ax, figsize=(4.2, 3.6))
    rows = np.asarray(rows)
    im = ax.imshow(rows, cmap="Blues")
    for (i, j), v in np.ndenumerate(rows):
        ax.text(j, i, str(int(v)), ha="center", va="center", color="white" if v > rows.max() / 2 else "black")
    ax.set_xlabel("destination rank")
    ax.set_ylabel("source rank")
    ax.set_xticks(range(rows.shape[1]))
    ax.set_yticks(range(rows.shape[0]))
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def _arrow(a, b, rad: float, size: float, color: str, lw: float) -> FancyArrowPatch:
    return FancyArrowPatch(
        a, b, connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>", mutation_scale=size, color=color, lw=lw
    )


def plot_token_traffic(
    experts: torch.Tensor | list[int], topo: Topology, source_gpu: int = 0, ax=None, title: str | None = None
) -> Figure:
    """One token's dispatch drawn on the cluster: nodes as columns of GPUs, its experts' GPUs filled, IB arrows
    from the source GPU to the landing GPU of each remote node (same in-node index), NVLink arrows from there."""
    fig, ax = fig_ax(ax, figsize=(9, 3.6))
    experts = torch.as_tensor(experts)
    gpus = sorted(set(topo.gpu_of(experts).tolist()))
    per_gpu = {g: int((topo.gpu_of(experts) == g).sum()) for g in gpus}
    src_node, src_local = divmod(source_gpu, topo.gpus_per_node)

    def xy(gpu):
        node, local = divmod(gpu, topo.gpus_per_node)
        return node * 1.6, topo.gpus_per_node - 1 - local

    for node in range(topo.n_nodes):
        ax.add_patch(Rectangle((node * 1.6 - 0.55, -0.6), 1.1, topo.gpus_per_node + 0.2, fill=False, lw=1, ec="0.6"))
        ax.text(node * 1.6, topo.gpus_per_node - 0.2, f"N{node}", ha="center", fontsize=8)
        for local in range(topo.gpus_per_node):
            g = node * topo.gpus_per_node + local
            x, y = xy(g)
            color = "tab:orange" if g in per_gpu else ("tab:green" if g == source_gpu else "0.9")
            ax.add_patch(Rectangle((x - 0.35, y - 0.35), 0.7, 0.7, color=color, ec="0.5"))
            if g in per_gpu:
                ax.text(x, y, f"×{per_gpu[g]}", ha="center", va="center", fontsize=8)
    ib = nvlink = 0
    for node in sorted({g // topo.gpus_per_node for g in gpus}):
        landing = node * topo.gpus_per_node + src_local
        if node != src_node:  # one copy over InfiniBand to the same-index GPU of the node
            ib += 1
            ax.add_patch(_arrow(xy(source_gpu), xy(landing), rad=-0.25, size=10, color="tab:red", lw=1.6))
        for g in gpus:  # then NVLink inside the node to each GPU holding a chosen expert
            if g // topo.gpus_per_node == node and g != landing:
                nvlink += 1
                ax.add_patch(_arrow(xy(landing), xy(g), rad=0.4, size=8, color="tab:blue", lw=1))
    ax.set_xlim(-0.8, (topo.n_nodes - 1) * 1.6 + 0.8)
    ax.set_ylim(-0.9, topo.gpus_per_node + 0.2)
    ax.set_aspect("equal")
    ax.axis("off")
    head = title or f"{len(experts)} experts"
    ax.set_title(
        f"{head}: {len({g // topo.gpus_per_node for g in gpus})} nodes, {len(gpus)} GPUs — "
        f"{ib} IB copies (red), {nvlink} NVLink copies (blue); green = source, orange = experts"
    )
    return fig


def plot_nodes_per_token(counts: pd.DataFrame, ax=None, limit: int | None = None, title: str | None = None) -> Figure:
    """Distribution of nodes reached per token: ``counts`` has columns ``routing`` (label), ``nodes`` and
    ``fraction`` (of tokens); one group of bars per routing. ``limit``: a dashed line at M."""
    fig, ax = fig_ax(ax, figsize=(6, 3.4))
    labels = list(dict.fromkeys(counts.routing))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        part = counts[counts.routing == label]
        ax.bar(part.nodes + (i - (len(labels) - 1) / 2) * width, part.fraction, width, label=label)
    if limit is not None:
        ax.axvline(limit + 0.5, color="k", ls="--", lw=0.8)
        ax.text(limit + 0.55, ax.get_ylim()[1] * 0.9, f"M = {limit}", fontsize=8)
    ax.set_xlabel("nodes reached by a token")
    ax.set_ylabel("fraction of tokens")
    ax.set_xticks(sorted(counts.nodes.unique()))
    ax.legend(fontsize=8)
    ax.set_title(title or "nodes per token")
    ax.grid(alpha=0.3, axis="y")
    return fig


def plot_node_loads(load: np.ndarray, topo: Topology, ax=None, title: str = "relative load per GPU") -> Figure:
    """load [layers, experts] (e.g. routed pairs) shown per GPU, relative to the mean, with node boundaries."""
    fig, ax = fig_ax(ax, figsize=(8, 2.6))
    load = np.asarray(load, dtype=float)
    per_gpu = load.reshape(load.shape[0], topo.n_gpus, -1).sum(-1)
    rel = per_gpu / per_gpu.mean(-1, keepdims=True)
    im = ax.imshow(rel, aspect="auto", cmap="RdBu_r", vmin=0, vmax=2)
    for node in range(1, topo.n_nodes):
        ax.axvline(node * topo.gpus_per_node - 0.5, color="k", lw=1)
    ax.set_xlabel(f"GPU ({topo.n_nodes} nodes × {topo.gpus_per_node}, {topo.experts_per_gpu} experts each)")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(rel.shape[0]))
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="load / mean")
    return fig


def plot_placement(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int, num_nodes: int, ax=None) -> Figure:
    """One layer's EPLB plan (the picture of DeepSeek's README): per GPU, its slots stacked by the load they carry
    (expert load / replicas), labelled by logical expert; replicated experts hatched."""
    fig, ax = fig_ax(ax, figsize=(8, 3.4))
    weight, phy2log = torch.as_tensor(weight).double(), torch.as_tensor(phy2log)
    loads = replica_loads(weight[None], phy2log[None])[0].view(num_gpus, -1)
    experts = phy2log.view(num_gpus, -1)
    count = torch.bincount(phy2log, minlength=weight.numel())
    cmap = plt.get_cmap("tab20")
    for g in range(num_gpus):
        bottom = 0.0
        for load, e in zip(loads[g].tolist(), experts[g].tolist()):
            ax.bar(g, load, bottom=bottom, color=cmap(e % 20), ec="k", lw=0.5, hatch="//" if count[e] > 1 else None)
            ax.text(g, bottom + load / 2, str(e), ha="center", va="center", fontsize=7)
            bottom += load
    per_node = num_gpus // num_nodes
    for node in range(1, num_nodes):
        ax.axvline(node * per_node - 0.5, color="k", ls="--", lw=0.8)
    mean = float(loads.sum() / num_gpus)
    ax.axhline(mean, color="k", lw=0.8, ls=":")
    ax.set_xticks(range(num_gpus))
    ax.set_xlabel(f"GPU ({num_nodes} nodes, dashed)")
    ax.set_ylabel("load")
    ax.set_title(f"EPLB plan: max/mean = {float(loads.sum(-1).max()) / mean:.3f} (hatched = replicated expert)")
    return fig


def plot_gpu_loads(weight: torch.Tensor, plans: dict[str, torch.Tensor], num_gpus: int, ax=None) -> Figure:
    """Per-GPU load of one layer under several plans (``{label: phy2log [P]}``), sorted from busiest to idlest, each
    labelled with its max/mean: the balance figure."""
    fig, ax = fig_ax(ax, figsize=(7, 3.4))
    weight = torch.as_tensor(weight).double()[None]
    for label, phy2log in plans.items():
        loads = gpu_loads(weight, torch.as_tensor(phy2log)[None], num_gpus)[0]
        ratio = float(imbalance(loads))
        ax.plot(
            range(num_gpus),
            loads.sort(descending=True).values / loads.mean(),
            marker="o",
            ms=3,
            label=f"{label}: max/mean {ratio:.3f}",
            color=POLICY_COLORS.get(label.split()[0]),
        )
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xlabel("GPU, busiest first")
    ax.set_ylabel("load / mean")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def plot_balance(table: pd.DataFrame, ax=None, title: str = "max/mean load per GPU") -> Figure:
    """Grouped bars from a table with columns ``config`` (label), ``before``, ``hierarchical`` and/or ``global``
    (max/mean per GPU): before vs after rebalancing, per configuration."""
    fig, ax = fig_ax(ax, figsize=(8, 3.6))
    series = [c for c in ("before", "hierarchical", "global") if c in table.columns]
    width = 0.8 / len(series)
    x = np.arange(len(table))
    for i, col in enumerate(series):
        vals = table[col].to_numpy(dtype=float)
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=col, color=POLICY_COLORS[col])
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xticks(x)
    ax.set_xticklabels(table.config, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("max / mean (1 = balanced)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return fig


def plot_drift(drift: pd.DataFrame, ax=None, title: str = "a plan ages as the loads drift") -> Figure:
    """Mean over start steps of max/mean per GPU against steps since the plan was made (``rebalance_drift``):
    the aging plan, a plan made on every step, and no rebalancing."""
    fig, ax = fig_ax(ax, figsize=(6, 3.4))
    mean = drift.groupby("h")[["after", "fresh", "before"]].mean()
    ax.plot(mean.index, mean.after, label="planned at h = 0, kept", color="tab:blue", lw=1.8)
    ax.plot(mean.index, mean.fresh, label="re-planned every step", color="tab:green", ls="--")
    if mean.before.notna().any():
        ax.plot(mean.index, mean.before, label="no rebalancing", color="tab:gray")
    return finish(ax, "steps since rebalancing", "max / mean per GPU", title)


def plot_traffic_vs_k(sweep: pd.DataFrame, ax=None, same_cost: float | None = None) -> Figure:
    """Dispatch time per token on IB and on NVLink (µs) against the experts per token K, from a table with columns
    ``k``, ``t_ib_us``, ``t_nvlink_us`` (and optionally ``routing``); ``same_cost``: the paper's 4 × 3.2."""
    fig, ax = fig_ax(ax, figsize=(6, 3.4))
    ax.plot(sweep.k, sweep.t_ib_us, marker="o", color="tab:red", label="IB (one copy per remote node)")
    ax.plot(sweep.k, sweep.t_nvlink_us, marker="o", color="tab:blue", label="NVLink (forwarding in the nodes)")
    if same_cost is not None:
        ax.axvline(same_cost, color="k", ls="--", lw=0.8)
        ax.text(same_cost + 0.1, ax.get_ylim()[0] * 1.05 + 0.01, f"4 × 3.2 = {same_cost:.1f}", fontsize=8)
    ax.set_xlabel("routed experts per token K (node-limited, M = 4)")
    ax.set_ylabel("dispatch time per token (µs)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig
