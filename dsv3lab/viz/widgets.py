"""ipywidgets explorers. Each wraps a pure plotting function of this package; a notebook shows the static figure of
that function first, so executed and exported notebooks keep a result even where widgets do not render.

* :func:`kv_rank_explorer` — MLA's latent rank d_c and rotary width d_h^R against the KV cache of MHA/GQA/MQA with
  the same heads (wraps :func:`dsv3lab.viz.plot_kv_vs_rank`). Notebook: 02_mla.
* :func:`load_scrubber` — step and layer sliders over the expert loads and selection biases of trained runs (wraps
  :func:`dsv3lab.viz.training.plot_load_step`). Notebook: 04_load_balancing.

A widget draws its figure into its ``Output`` by setting the output's state (:func:`show_figure`), not by printing
inside ``with out:``: a redraw from a slider callback then cannot escape to JupyterLab's log console, whatever the
kernel's message routing does, and the saved widget state carries the figure into exported pages.
"""

from __future__ import annotations

import base64
import io

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from ..accounting import kv_cache_comparison
from ..config import ModelConfig
from .architecture import plot_kv_vs_rank
from .training import plot_load_step

RANKS = [16, 32, 64, 128, 256, 512, 1024, 2048]
ROPE_DIMS = [16, 32, 64, 128]


def figure_output(fig: Figure, dpi: int = 80) -> dict:
    """A Jupyter ``display_data`` output holding ``fig`` as PNG (what an ``Output`` widget stores)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return {
        "output_type": "display_data",
        "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"), "text/plain": repr(fig)},
        "metadata": {},
    }


def show_figure(out, fig: Figure) -> None:
    """Replace what the ``ipywidgets.Output`` ``out`` shows by ``fig`` in one state update, and close ``fig``."""
    try:
        out.outputs = (figure_output(fig),)
    finally:
        plt.close(fig)


def _times(a: float, b: float) -> str:
    """``a`` as a multiple of ``b``: '9.0×' or '0.44×' (never 'more' for less)."""
    r = a / b
    return f"{r:.1f}×" if r >= 1 else f"{r:.2f}×"


def kv_rank_summary(cfg: ModelConfig, gqa_groups: int = 8) -> str:
    """One line: MLA bytes per token (all layers, BF16) against MHA/GQA/MQA, and the GQA group count it equals."""
    kv = kv_cache_comparison(cfg, gqa_groups)
    mla, mha = kv["MLA (latent)"], kv["MHA"]
    equivalent_groups = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) / (2 * cfg.qk_nope_head_dim)
    return (
        f"{cfg.name}: d_c={cfg.kv_lora_rank}, d_h^R={cfg.qk_rope_head_dim} → MLA {mla:,} B/token; "
        f"MHA {mha:,} = {_times(mha, mla)} MLA, GQA-{min(gqa_groups, cfg.n_heads)} {kv['GQA']:,}, "
        f"MQA {kv['MQA']:,}; MLA's cache equals GQA with {equivalent_groups:.2f} groups"
    )


def kv_rank_explorer(preset: str = "671B", presets: tuple[str, ...] = ("toy", "small", "16B", "236B", "671B")):
    """Sliders for the preset, d_c (``kv_lora_rank``), d_h^R (``qk_rope_head_dim``) and the GQA group count; redraws
    :func:`plot_kv_vs_rank` and a one-line summary. Choosing a preset sets d_c, d_h^R and the group count to that
    preset's values. Returns the widget (display it, or read ``.children``: [preset, groups], [d_c, d_h^R], summary,
    plot)."""
    import ipywidgets as w

    if preset not in presets:
        raise ValueError(f"preset must be one of {presets}, got {preset!r}")
    cfgs = {p: ModelConfig.preset(p) for p in presets}
    ranks = sorted(set(RANKS) | {c.kv_lora_rank for c in cfgs.values()})
    rope_dims = sorted(set(ROPE_DIMS) | {c.qk_rope_head_dim for c in cfgs.values()})
    base = cfgs[preset]
    preset_w = w.Dropdown(options=list(presets), value=preset, description="preset")
    rank_w = w.SelectionSlider(options=ranks, value=base.kv_lora_rank, description="d_c")
    rope_w = w.SelectionSlider(options=rope_dims, value=base.qk_rope_head_dim, description="d_h^R")
    groups_w = w.IntSlider(value=min(8, base.n_heads), min=1, max=base.n_heads, description="GQA groups")
    summary = w.HTML()
    out = w.Output()
    busy = [False]  # a preset change moves three sliders: draw once, after all of them

    def redraw(*_):
        if busy[0]:
            return
        cfg = cfgs[preset_w.value].replace(kv_lora_rank=rank_w.value, qk_rope_head_dim=rope_w.value)
        summary.value = f"<code>{kv_rank_summary(cfg, groups_w.value)}</code>"
        show_figure(out, plot_kv_vs_rank(cfg, gqa_groups=groups_w.value))

    def on_preset(change):
        cfg = cfgs[change["new"]]
        busy[0] = True
        try:
            groups_w.max = cfg.n_heads
            groups_w.value = min(8, cfg.n_heads)
            rank_w.value = cfg.kv_lora_rank
            rope_w.value = cfg.qk_rope_head_dim
        finally:
            busy[0] = False
        redraw()

    preset_w.observe(on_preset, names="value")
    for widget in (rank_w, rope_w, groups_w):
        widget.observe(redraw, names="value")
    redraw()
    return w.VBox([w.HBox([preset_w, groups_w]), w.HBox([rank_w, rope_w]), summary, out])


def load_scrubber(counts: dict[str, np.ndarray], bias: dict[str, np.ndarray], window: int = 5):
    """A run picker and step/layer sliders over :func:`plot_load_step`: ``counts[name]`` and ``bias[name]`` are the
    ``loads.npz`` arrays [steps, MoE layers, experts] of each run. Starts at the last step of the first run.
    Returns the widget (``.children``: [run, step, layer], plot)."""
    import ipywidgets as w

    if not counts or set(counts) != set(bias):
        raise ValueError(f"counts and bias must name the same runs, got {sorted(counts)} and {sorted(bias)}")
    names = list(counts)
    steps, layers = counts[names[0]].shape[0], bias[names[0]].shape[1]
    run_w = w.Dropdown(options=names, value=names[0], description="run")
    step_w = w.IntSlider(value=steps - 1, min=0, max=steps - 1, description="step")
    layer_w = w.IntSlider(value=0, min=0, max=layers - 1, description="MoE layer")
    out = w.Output()

    def redraw(*_):
        c, b = counts[run_w.value], bias[run_w.value]
        step, layer = min(step_w.value, c.shape[0] - 1), min(layer_w.value, b.shape[1] - 1)
        show_figure(out, plot_load_step(c, b, step, layer, window=window, name=run_w.value))

    for widget in (run_w, step_w, layer_w):
        widget.observe(redraw, names="value")
    redraw()
    return w.VBox([w.HBox([run_w, step_w, layer_w]), out])
