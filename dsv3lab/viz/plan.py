"""The planner's per-GPU memory as stacked bars: one bar per layout, one colour per item, the GPU's memory as a line.

Input: :func:`dsv3lab.plan.plan_table` of labelled :func:`dsv3lab.plan.plan` results. Notebook: 11_scale_to_full.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..plan import ITEMS
from ._common import fig_ax


def plot_plan_memory(table: pd.DataFrame, ax=None, title: str = "Per-GPU memory of the fullest rank") -> Figure:
    """Stacked bars of the items of :data:`dsv3lab.plan.ITEMS` (GB) per ``layout``; a black tick marks each layout's
    GPU memory and the label says whether it fits."""
    fig, ax = fig_ax(ax, (max(6, 1.6 * len(table) + 3), 4))
    pos = np.arange(len(table))
    bottom = np.zeros(len(table))
    for item in ITEMS:
        vals = table[item].to_numpy(dtype=float)
        if not np.any(vals > 0):
            continue
        ax.bar(pos, vals, 0.6, bottom=bottom, label=item.replace("_", " "))
        bottom += vals
    ax.hlines(table["gpu_mem_gb"], pos - 0.4, pos + 0.4, color="black", lw=2, zorder=3, label="GPU memory")
    labels = [f"{lay}\n{'fits' if ok else 'does not fit'}" for lay, ok in zip(table["layout"], table["fits"])]
    ax.set_xticks(pos, labels, fontsize=8)
    ax.set_ylabel("GB per GPU")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig
