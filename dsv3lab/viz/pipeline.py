"""Pipeline pictures (DeepSeek-V3 §3.2.1, Fig. 5): the Gantt chart of a (simulated or measured) timeline, the bubble
against the number of micro-batches, and executed-versus-simulated busy/idle bars.

Every function takes data (a :class:`dsv3lab.parallel.simulator.Timeline`, or rows) and an optional ``ax`` and
returns the Figure. Notebook: 08_dualpipe.
"""

from __future__ import annotations

import matplotlib.patches as mpatches
import pandas as pd
from matplotlib.figure import Figure

from ._common import fig_ax

# kind -> (colour of direction 0, colour of direction 1): the second direction of DualPipe in lighter shades
COLOURS = {
    "F": ("#4C72B0", "#9DB9E3"),
    "B": ("#55A868", "#A8D8AA"),
    "W": ("#8172B3", "#C7BEE8"),
    "BW": ("#DD8452", "#F3C3A1"),
}
LABELS = {"F": "forward F", "B": "backward for input B", "W": "backward for weights W", "BW": "full backward (B+W)"}


def plot_gantt(timeline, ax=None, title: str | None = None, labels: bool = True, unit: str = "") -> Figure:
    """Ranks (top to bottom) against time, one box per action, coloured by kind (F, B, W, full backward) and, for
    DualPipe, by direction (lighter: the micro-batches that enter at the last rank). An overlapped F&B pair is one
    box with a black border, forward in its upper half and backward in its lower half, as in the paper's Fig. 5.
    (DualPipeV: lighter for each rank's second stage, the V's way back.)
    Box labels are micro-batch numbers within their direction. ``timeline``: anything with ``events`` (rank,
    action, start, end), ``schedule`` and ``makespan`` — a simulated :class:`Timeline` or a measured one."""
    s = timeline.schedule
    fig, ax = fig_ax(ax, (max(8, min(18, 0.35 * len(timeline.events) / max(1, s.n_ranks))), 0.55 * s.n_ranks + 1.2))
    first_mb = {c: min((mb for mb, ch in enumerate(s.mb_chain) if ch == c), default=0) for c in range(len(s.chains))}
    span = float(timeline.makespan) or 1.0

    def shade(rank, part) -> int:  # 1 (lighter) for DualPipe's reverse direction and the rising arm of a V
        if len(s.chains) > 1:
            return min(s.mb_chain[part.mb], 1)
        held = s.stages_of(rank)
        return min(held.index(part.stage), 1) if len(held) > 1 and part.stage in held else 0

    def box(rank, part, x0, width, y0, height):
        chain = s.mb_chain[part.mb]
        colour = COLOURS[part.kind][shade(rank, part)]
        ax.add_patch(mpatches.Rectangle((x0, y0), width, height, facecolor=colour, edgecolor="white", linewidth=0.5))
        if labels and width > 0.012 * span:
            ax.text(
                x0 + width / 2, y0 + height / 2, str(part.mb - first_mb[chain]), ha="center", va="center", fontsize=7
            )

    for rank, action, start, end in timeline.events:
        start, end = float(start), float(end)
        y = rank - 0.4
        if action.pair is None:
            box(rank, action, start, end - start, y, 0.8)
        else:
            fwd, bwd = action.pair
            box(rank, fwd, start, end - start, y, 0.4)
            box(rank, bwd, start, end - start, y + 0.4, 0.4)
            ax.add_patch(mpatches.Rectangle((start, y), end - start, 0.8, fill=False, edgecolor="black", linewidth=1.2))
    ax.set_xlim(0, span)
    ax.set_ylim(s.n_ranks - 0.5, -0.5)
    ax.set_yticks(range(s.n_ranks))
    ax.set_yticklabels([f"rank {r}" for r in range(s.n_ranks)])
    ax.set_xlabel(f"time{' (' + unit + ')' if unit else ''}")
    kinds = sorted({p.kind for _, a, _, _ in timeline.events for p in a.parts()}, key=list(COLOURS).index)
    handles = [mpatches.Patch(color=COLOURS[k][0], label=LABELS[k]) for k in kinds]
    if len(s.chains) > 1 or any(len(s.stages_of(r)) > 1 for r in range(s.n_ranks)):
        handles.append(mpatches.Patch(color=COLOURS["F"][1], label="lighter: reverse direction / second stage"))
    if any(a.pair is not None for _, a, _, _ in timeline.events):
        handles.append(mpatches.Patch(facecolor="white", edgecolor="black", label="overlapped F&B (F top, B bottom)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, borderaxespad=0)
    bubble = max(float(b) for b in timeline.bubble)
    ax.set_title(
        title
        or f"{s.name}: PP = {s.pp}, {s.n_micro} micro-batches, {s.n_ranks} devices — "
        f"makespan {span:.4g}, bubble {bubble:.4g}",
        fontsize=10,
    )
    return fig


def plot_bubble_vs_micro(rows, ax=None, y: str = "bubble", title: str | None = None) -> Figure:
    """One line per schedule: ``y`` (``bubble``, the idle time per device, or ``bubble_fraction``, idle / makespan)
    against the number of micro-batches. ``rows``: a DataFrame or records with ``schedule``, ``n_micro`` and ``y``
    (as :func:`dsv3lab.parallel.simulator.sweep_micro_batches` returns)."""
    df = pd.DataFrame(rows)
    fig, ax = fig_ax(ax, (7, 3.8))
    for name, g in df.groupby("schedule", sort=False):
        g = g.sort_values("n_micro")
        ax.plot(g.n_micro, g[y], marker="o", label=name)
    ax.set_xlabel("micro-batches per step")
    ax.set_ylabel({"bubble": "bubble per device (time)", "bubble_fraction": "bubble / makespan"}.get(y, y))
    ax.set_title(title or f"{y.replace('_', ' ')} vs micro-batches")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_busy_idle(rows, ax=None, title: str | None = None) -> Figure:
    """Executed against simulated: for each schedule and rank, two stacked bars of busy and idle time, measured
    (dark) and the simulator's prediction (light). ``rows``: records with ``schedule``, ``rank``, ``source``
    ("measured" or "simulated"), ``busy_s`` and ``idle_s``."""
    df = pd.DataFrame(rows)
    fig, ax = fig_ax(ax, (8, 3.8))
    groups = list(dict.fromkeys(zip(df.schedule, df["rank"])))
    for x, (schedule, rank) in enumerate(groups):
        for dx, source, colour in ((-0.2, "measured", "#4C72B0"), (0.2, "simulated", "#9DB9E3")):
            r = df[(df.schedule == schedule) & (df["rank"] == rank) & (df.source == source)].iloc[0]
            ax.bar(x + dx, r.busy_s, width=0.38, color=colour)
            ax.bar(x + dx, r.idle_s, width=0.38, bottom=r.busy_s, color="#dddddd", edgecolor="#999999")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{s}\nrank {r}" for s, r in groups], fontsize=8)
    ax.set_ylabel("seconds per step")
    ax.set_title(title or "busy and idle time per rank: executed vs simulated", fontsize=10)
    ax.legend(
        handles=[
            mpatches.Patch(color="#4C72B0", label="busy, measured"),
            mpatches.Patch(color="#9DB9E3", label="busy, simulated"),
            mpatches.Patch(facecolor="#dddddd", edgecolor="#999999", label="idle"),
        ],
        fontsize=8,
    )
    return fig
