"""ipywidgets explorers. Each wraps a pure plotting function of this package; a notebook shows the static figure of
that function first, so executed and exported notebooks keep a result even where widgets do not render.

* :func:`kv_rank_explorer` — MLA's latent rank d_c and rotary width d_h^R against the KV cache of MHA/GQA/MQA with
  the same heads (wraps :func:`dsv3lab.viz.plot_kv_vs_rank`). Notebook: 02_mla.
* :func:`pipeline_explorer` — a pipeline schedule's simulated Gantt chart under chosen PP, micro-batches, chunk
  costs and all-to-all overlap (wraps :func:`dsv3lab.viz.pipeline.plot_gantt`). Notebook: 08_dualpipe.
"""

from __future__ import annotations

import matplotlib.pyplot as plt

from ..accounting import kv_cache_comparison
from ..config import ModelConfig
from .architecture import plot_kv_vs_rank

RANKS = [16, 32, 64, 128, 256, 512, 1024, 2048]
ROPE_DIMS = [16, 32, 64, 128]


def kv_rank_summary(cfg: ModelConfig, gqa_groups: int = 8) -> str:
    """One line: MLA bytes per token (all layers, BF16) against MHA/GQA/MQA, and the GQA group count it equals."""
    kv = kv_cache_comparison(cfg, gqa_groups)
    mla, mha = kv["MLA (latent)"], kv["MHA"]
    equivalent_groups = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) / (2 * cfg.qk_nope_head_dim)
    return (
        f"{cfg.name}: d_c={cfg.kv_lora_rank}, d_h^R={cfg.qk_rope_head_dim} → MLA {mla:,} B/token, "
        f"MHA {mha:,} ({mha / mla:.1f}× more), GQA-{min(gqa_groups, cfg.n_heads)} {kv['GQA']:,}, "
        f"MQA {kv['MQA']:,}; MLA's cache equals GQA with {equivalent_groups:.2f} groups"
    )


def kv_rank_explorer(preset: str = "671B", presets: tuple[str, ...] = ("toy", "small", "16B", "236B", "671B")):
    """Sliders for the preset, d_c (``kv_lora_rank``), d_h^R (``qk_rope_head_dim``) and the GQA group count; redraws
    :func:`plot_kv_vs_rank` and a one-line summary. Returns the widget (display it, or read ``.children``)."""
    import ipywidgets as w
    from IPython.display import display

    base = ModelConfig.preset(preset)
    preset_w = w.Dropdown(options=list(presets), value=preset, description="preset")
    rank_w = w.SelectionSlider(
        options=RANKS, value=base.kv_lora_rank if base.kv_lora_rank in RANKS else 512, description="d_c"
    )
    rope_w = w.SelectionSlider(
        options=ROPE_DIMS,
        value=base.qk_rope_head_dim if base.qk_rope_head_dim in ROPE_DIMS else 64,
        description="d_h^R",
    )
    groups_w = w.IntSlider(value=min(8, base.n_heads), min=1, max=base.n_heads, description="GQA groups")
    summary = w.HTML()
    out = w.Output()

    def update(*_):
        cfg = ModelConfig.preset(preset_w.value)
        groups_w.max = cfg.n_heads
        cfg = cfg.replace(kv_lora_rank=rank_w.value, qk_rope_head_dim=rope_w.value)
        summary.value = f"<code>{kv_rank_summary(cfg, groups_w.value)}</code>"
        fig = plot_kv_vs_rank(cfg, gqa_groups=groups_w.value)
        with out:
            out.clear_output(wait=True)
            display(fig)
        plt.close(fig)

    for widget in (preset_w, rank_w, rope_w, groups_w):
        widget.observe(update, names="value")
    update()
    return w.VBox([w.HBox([preset_w, groups_w]), w.HBox([rank_w, rope_w]), summary, out])


def pipeline_summary(name: str, pp: int, n_micro: int, costs) -> str:
    """One line: the simulated bubble, activations and devices against Table 2's row."""
    from ..parallel.schedules import make_schedule
    from ..parallel.simulator import TABLE2_FORMULAS, simulate, table2

    t = simulate(make_schedule(name, pp, n_micro), costs).summary()
    row = table2(name, pp, costs)
    return (
        f"{name}: makespan {t['makespan']:.3g}, bubble {t['bubble']:.3g} per device (Table 2 "
        f"{TABLE2_FORMULAS[name][0]} = {row['bubble']:.3g}), activations {t['activation_peak']} "
        f"(Table 2 {row['activation']}), parameters {t['param_copies']}×, {t['devices']} devices"
    )


def pipeline_explorer(schedule: str = "dualpipe", pp: int = 8, n_micro: int = 20):
    """Controls for the schedule, PP, micro-batches, F, B, W, the all-to-all per chunk and whether F&B pairs hide it;
    redraws :func:`dsv3lab.viz.pipeline.plot_gantt` of the simulated timeline and a summary against Table 2.
    Impossible combinations (DualPipe needs an even count >= 2·PP) show the error instead. Notebook: 08_dualpipe."""
    import ipywidgets as w
    from IPython.display import display

    from ..parallel.schedules import SCHEDULES, make_schedule
    from ..parallel.simulator import Costs, simulate
    from .pipeline import plot_gantt

    name_w = w.Dropdown(options=list(SCHEDULES), value=schedule, description="schedule")
    pp_w = w.IntSlider(value=pp, min=2, max=16, step=2, description="PP")
    m_w = w.IntSlider(value=n_micro, min=2, max=48, step=2, description="micro-batches")
    f_w = w.FloatSlider(value=1.0, min=0.2, max=3.0, step=0.1, description="F")
    b_w = w.FloatSlider(value=2.0, min=0.2, max=6.0, step=0.1, description="B (full)")
    w_w = w.FloatSlider(value=1.0, min=0.0, max=3.0, step=0.1, description="W")
    a2a_w = w.FloatSlider(value=0.0, min=0.0, max=3.0, step=0.1, description="all-to-all")
    overlap_w = w.Checkbox(value=True, description="F&B hides the all-to-all")
    summary = w.HTML()
    out = w.Output()

    def update(*_):
        with out:
            out.clear_output(wait=True)
            try:
                costs = Costs(
                    f=f_w.value, b=b_w.value, w=min(w_w.value, b_w.value), a2a=a2a_w.value, overlap=overlap_w.value
                )
                timeline = simulate(make_schedule(name_w.value, pp_w.value, m_w.value), costs)
                summary.value = f"<code>{pipeline_summary(name_w.value, pp_w.value, m_w.value, costs)}</code>"
            except ValueError as err:
                summary.value = f"<code>{err}</code>"
                return
            fig = plot_gantt(timeline, labels=m_w.value <= 24)
            display(fig)
            plt.close(fig)

    for widget in (name_w, pp_w, m_w, f_w, b_w, w_w, a2a_w, overlap_w):
        widget.observe(update, names="value")
    update()
    return w.VBox([w.HBox([name_w, pp_w, m_w]), w.HBox([f_w, b_w, w_w]), w.HBox([a2a_w, overlap_w]), summary, out])
