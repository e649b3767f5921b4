"""Helpers shared by the plotting modules."""

from __future__ import annotations

import matplotlib.pyplot as plt


def fig_ax(ax=None, figsize=(7, 4)):
    """``(figure, axes)``: a new figure when ``ax`` is None (with constrained layout, which keeps labels, titles and
    colorbars from overlapping), else ``ax`` and the figure it belongs to."""
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    else:
        fig = ax.figure
    return fig, ax


def finish(ax, xlabel: str, ylabel: str, title: str | None = None, legend: bool = True):
    """Label the axes (and title), add a small legend and a light grid; returns the figure (the usual last line of a
    ``plot_x`` function)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if legend:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax.figure
