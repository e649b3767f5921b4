"""Overlapping labels: find text of a drawn figure that covers other text (an axis label on a colorbar's ticks, a
title on the panel above), the defect a layout engine (``layout="constrained"``) prevents.

* :func:`text_overlaps` — the pairs of overlapping titles, axis labels and tick labels of a figure, measured from
  the renderer's bounding boxes after a draw.
* :func:`warn_on_overlaps` — a matplotlib figure hook (``rcParams["figure.hooks"]``): every time the figure is
  drawn (shown inline, saved), it warns with :class:`LayoutWarning` if any text overlaps. The notebook tests and the
  site builder switch it on for every pyplot figure through a ``matplotlibrc``; a library figure is tested directly.
"""

from __future__ import annotations

import warnings

from matplotlib.figure import Figure
from matplotlib.text import Text

# Two boxes that share less than this many pixels in either direction only touch.
TOLERANCE_PX = 1.0


class LayoutWarning(UserWarning):
    """Text of a figure overlaps other text."""


def _labelled_texts(fig: Figure, renderer) -> list[tuple[str, str, Text]]:
    """``(owner, role, text)`` for every visible, non-empty title, axis label and drawn tick label of ``fig``.

    A tick label counts as drawn when its centre lies within its axes' extent along the axis (matplotlib keeps
    labels of ticks outside the view limits, invisible to the eye but with stale positions)."""
    found: list[tuple[str, str, Text]] = []
    suptitle = getattr(fig, "_suptitle", None)  # Figure.suptitle's artist; there is no public getter
    if suptitle is not None:
        found.append(("figure", "suptitle", suptitle))
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        owner = f"axes {i} ({ax.get_label() or ax.get_title() or 'untitled'})"
        for loc in ("left", "center", "right"):
            found.append((owner, "title", ax.title if loc == "center" else getattr(ax, f"_{loc}_title")))
        if not ax.axison:  # ax.axis("off"): no labels or ticks are drawn
            continue
        box = ax.get_window_extent(renderer)
        if ax.xaxis.get_visible():  # a twin's shared axis is hidden, its labels still report visible
            found.append((owner, "xlabel", ax.xaxis.label))
            for t in ax.get_xticklabels():
                e = t.get_window_extent(renderer)
                if box.x0 - TOLERANCE_PX <= (e.x0 + e.x1) / 2 <= box.x1 + TOLERANCE_PX:
                    found.append((owner, "xtick", t))
        if ax.yaxis.get_visible():
            found.append((owner, "ylabel", ax.yaxis.label))
            for t in ax.get_yticklabels():
                e = t.get_window_extent(renderer)
                if box.y0 - TOLERANCE_PX <= (e.y0 + e.y1) / 2 <= box.y1 + TOLERANCE_PX:
                    found.append((owner, "ytick", t))
    return [(o, r, t) for o, r, t in found if t.get_visible() and t.get_text().strip()]


def text_overlaps(fig: Figure) -> list[str]:
    """Every pair of overlapping texts of ``fig`` as one line each, e.g. ``"axes 1 ylabel 'bias' overlaps axes 2
    ytick '2'"``; empty when nothing overlaps. Tick labels of one axis crowding each other are not counted (a
    layout engine cannot help there). Draws the figure first."""
    fig.canvas.draw()
    return _overlaps(fig, fig.canvas.get_renderer())


def _overlaps(fig: Figure, renderer) -> list[str]:
    """:func:`text_overlaps` of a figure just drawn with ``renderer``."""
    texts = _labelled_texts(fig, renderer)
    boxes = [t.get_window_extent(renderer) for _, _, t in texts]
    found = []
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            (oi, ri, ti), (oj, rj, tj) = texts[i], texts[j]
            if oi == oj and ri == rj and ri in ("xtick", "ytick"):
                continue
            a, b = boxes[i], boxes[j]
            dx = min(a.x1, b.x1) - max(a.x0, b.x0)
            dy = min(a.y1, b.y1) - max(a.y0, b.y0)
            if dx > TOLERANCE_PX and dy > TOLERANCE_PX:
                found.append(f"{oi} {ri} {ti.get_text()!r} overlaps {oj} {rj} {tj.get_text()!r}")
    return found


def warn_on_overlaps(fig: Figure) -> None:
    """Figure hook: after each draw of ``fig``, warn (once per figure) with :class:`LayoutWarning` naming the
    overlapping texts. Switch on with ``rcParams["figure.hooks"] = ["dsv3lab.viz.layout:warn_on_overlaps"]``."""
    state = {"warned": False}

    def on_draw(event):
        if state["warned"]:
            return
        problems = _overlaps(fig, event.renderer)
        if problems:
            state["warned"] = True
            title = fig.get_suptitle() or next((ax.get_title() for ax in fig.axes if ax.get_title()), "")
            warnings.warn(
                f"overlapping labels in figure {title!r}: " + "; ".join(problems[:5]), LayoutWarning, stacklevel=2
            )

    fig.canvas.mpl_connect("draw_event", on_draw)
