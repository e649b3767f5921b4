"""Pure plotting functions ``plot_x(data, ax=None) -> Figure`` and ipywidgets explorers that wrap them.

Modules: ``architecture`` (presets, KV cache, RoPE/YaRN, routing, gates), ``data`` (tokens per domain, document
lengths, FIM, packing), ``inference`` (cache budgets, decode cost, speculative acceptance), ``measurements`` (losses
over steps, grouped bars of timings and counts), ``plan`` (the planner's per-GPU memory bars), ``training`` (curves,
expert-load heatmaps, bias trajectories), ``widgets`` (interactive explorers; import ``dsv3lab.viz.widgets``
explicitly).
"""

from .architecture import (
    plot_expert_counts,
    plot_gate_scores,
    plot_group_routing,
    plot_kv_cache,
    plot_kv_vs_rank,
    plot_params,
    plot_rope_frequencies,
    plot_yarn,
    plot_yarn_ramp,
)
from .data import plot_doc_lengths, plot_fim_example, plot_packing, plot_tokens_per_domain
from .inference import plot_acceptance, plot_acceptance_over_training, plot_attention_cost, plot_max_context
from .measurements import plot_bars, plot_step_losses
from .plan import plot_plan_memory

__all__ = [
    "plot_bars",
    "plot_expert_counts",
    "plot_gate_scores",
    "plot_group_routing",
    "plot_kv_cache",
    "plot_kv_vs_rank",
    "plot_params",
    "plot_rope_frequencies",
    "plot_step_losses",
    "plot_yarn",
    "plot_yarn_ramp",
    "plot_doc_lengths",
    "plot_fim_example",
    "plot_packing",
    "plot_tokens_per_domain",
    "plot_acceptance",
    "plot_acceptance_over_training",
    "plot_attention_cost",
    "plot_max_context",
    "plot_plan_memory",
]
