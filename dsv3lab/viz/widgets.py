"""ipywidgets explorers. Each wraps a pure plotting function of this package; a notebook shows the static figure of
that function first, so executed and exported notebooks keep a result even where widgets do not render.

* :func:`kv_rank_explorer` — MLA's latent rank d_c and rotary width d_h^R against the KV cache of MHA/GQA/MQA with
  the same heads (wraps :func:`dsv3lab.viz.plot_kv_vs_rank`). Notebook: 02_mla.
* :func:`eplb_explorer` — nodes × GPUs × redundant slots over the per-GPU loads before and after EPLB (wraps
  :func:`dsv3lab.viz.expert_parallel.plot_gpu_loads`). Notebook: 09_expert_parallel.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from ..accounting import kv_cache_comparison
from ..config import ModelConfig
from ..parallel.eplb import contiguous_placement, rebalance_experts, resolve_policy
from .architecture import plot_kv_vs_rank
from .expert_parallel import plot_gpu_loads

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


def eplb_explorer(weight, num_groups: int, layer: int = 0):
    """Sliders for nodes, GPUs per node and redundant slots per GPU (and the policy) over the EPLB balance figure
    (:func:`dsv3lab.viz.expert_parallel.plot_gpu_loads`) of one layer of ``weight`` [L, E] expert loads.
    Notebook: 09_expert_parallel."""
    import ipywidgets as w
    from IPython.display import display

    weight = torch.as_tensor(weight).double()
    n_log = weight.shape[1]
    nodes_w = w.IntSlider(value=2, min=1, max=8, description="nodes")
    gpus_w = w.IntSlider(value=4, min=1, max=8, description="GPUs/node")
    extra_w = w.IntSlider(value=1, min=0, max=4, description="extra slots/GPU")
    policy_w = w.Dropdown(options=["auto", "hierarchical", "global"], value="auto", description="policy")
    summary = w.HTML()
    out = w.Output()

    def update(*_):
        nodes, gpus = nodes_w.value, nodes_w.value * gpus_w.value
        replicas = gpus * (-(-n_log // gpus) + extra_w.value)  # enough slots for every expert, plus the extras
        policy = policy_w.value
        if resolve_policy(policy, num_groups, nodes) == "hierarchical" and num_groups % nodes:
            summary.value = f"<code>the hierarchical policy needs nodes to divide the {num_groups} groups</code>"
            return
        phy2log = rebalance_experts(weight[layer : layer + 1], replicas, num_groups, nodes, gpus, policy)[0][0]
        plans = {f"{resolve_policy(policy, num_groups, nodes)} ({replicas} slots)": phy2log}
        if n_log % gpus == 0:
            plans = {"before (contiguous)": contiguous_placement(1, n_log)[0], **plans}
        summary.value = f"<code>{n_log} experts, {replicas} slots on {nodes} nodes × {gpus_w.value} GPUs</code>"
        fig = plot_gpu_loads(weight[layer], plans, gpus)
        with out:
            out.clear_output(wait=True)
            display(fig)
        plt.close(fig)

    for widget in (nodes_w, gpus_w, extra_w, policy_w):
        widget.observe(update, names="value")
    update()
    return w.VBox([w.HBox([nodes_w, gpus_w]), w.HBox([extra_w, policy_w]), summary, out])
