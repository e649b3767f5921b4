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
