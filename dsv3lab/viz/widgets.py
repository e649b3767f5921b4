"""ipywidgets explorers. Each wraps a pure plotting function of this package; a notebook shows the static figure of
that function first, so executed and exported notebooks keep a result even where widgets do not render.

* :func:`kv_rank_explorer` — MLA's latent rank d_c and rotary width d_h^R against the KV cache of MHA/GQA/MQA with
  the same heads (wraps :func:`dsv3lab.viz.plot_kv_vs_rank`). Notebook: 02_mla.
* :func:`plan_explorer` — a training layout (GPUs, PP, EP, ZeRO, micro-batch, sequence) planned beside the paper's
  (wraps :func:`dsv3lab.viz.plot_plan_memory` over :func:`dsv3lab.plan.plan`). Notebook: 11_scale_to_full.
"""

from __future__ import annotations

import matplotlib.pyplot as plt

from ..accounting import kv_cache_comparison
from ..config import ModelConfig
from ..plan import PAPER_TRAINING, Layout, plan, plan_table
from .architecture import plot_kv_vs_rank
from .plan import plot_plan_memory

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


def plan_summary(result: dict) -> str:
    """One line of a :func:`dsv3lab.plan.plan` result: fits, total, step time, GPU-hours per 10^12 tokens."""
    per = result["per_gpu_bytes"]
    verdict = "fits" if result["fits"] else "does not fit"
    return (
        f"{verdict}: {per['total'] / 1e9:.1f} of {result['gpu_mem_bytes'] / 1e9:.1f} GB on rank "
        f"{result['fullest_rank']}; step {result['step_s']:.1f} s, "
        f"{result['gpu_hours_per_trillion_tokens'] / 1e3:.0f}K GPU-hours per 10^12 tokens at MFU {result['mfu']:.1%}"
        + ("" if result["fits"] else " — " + "; ".join(result["explanation"][1:]))
    )


def plan_explorer(preset: str = "671B", gpu: str = "H800", recipe: str = "paper"):
    """Sliders for GPUs, PP, EP, ZeRO, micro-batch and sequence length; redraws :func:`plot_plan_memory` for that
    layout beside the paper's (PP16 DualPipe, EP64, ZeRO-1 on 2048 GPUs) and a summary line, or the error of an
    impossible layout. Returns the widget."""
    import ipywidgets as w
    from IPython.display import display

    cfg = ModelConfig.preset(preset)
    reference = plan(cfg, PAPER_TRAINING, gpu=gpu, rec=recipe) if preset == "671B" else None
    gpus_w = w.SelectionSlider(options=[2**k for k in range(13)], value=2048, description="GPUs")
    pp_w = w.SelectionSlider(options=[1, 2, 4, 8, 16, 32], value=16, description="PP")
    ep_w = w.SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64, 128, 256], value=64, description="EP")
    zero_w = w.IntSlider(value=1, min=0, max=3, description="ZeRO")
    mb_w = w.SelectionSlider(options=[1, 2, 4, 8], value=1, description="micro-batch")
    seq_w = w.SelectionSlider(options=[1024, 2048, 4096, 8192, 16384, 32768], value=4096, description="sequence")
    summary = w.HTML()
    out = w.Output()

    def update(*_):
        layout = Layout(
            gpus=gpus_w.value, pp=pp_w.value, ep=ep_w.value, zero=zero_w.value, micro_batch=mb_w.value, seq=seq_w.value
        )
        try:
            result = plan(cfg, layout, gpu=gpu, rec=recipe)
        except ValueError as err:
            summary.value = f"<code>{err}</code>"
            return
        summary.value = f"<code>{plan_summary(result)}</code>"
        plans = {"this layout": result} | ({"paper's layout": reference} if reference else {})
        fig = plot_plan_memory(plan_table(plans))
        with out:
            out.clear_output(wait=True)
            display(fig)
        plt.close(fig)

    for widget in (gpus_w, pp_w, ep_w, zero_w, mb_w, seq_w):
        widget.observe(update, names="value")
    update()
    return w.VBox([w.HBox([gpus_w, pp_w, ep_w]), w.HBox([zero_w, mb_w, seq_w]), summary, out])
