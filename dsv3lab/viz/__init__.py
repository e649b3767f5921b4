"""Pure plotting functions ``plot_x(data, ax=None) -> Figure`` and ipywidgets explorers that wrap them.

Modules: ``architecture`` (presets, KV cache, RoPE/YaRN, routing), ``fp8`` (FP8 grids, scaling, accumulation,
training curves), ``widgets`` (interactive explorers).
"""

from .architecture import (
    plot_group_routing,
    plot_kv_cache,
    plot_kv_vs_rank,
    plot_params,
    plot_rope_frequencies,
    plot_yarn_ramp,
)
from .fp8 import (
    plot_accumulation_vs_bits,
    plot_accumulation_vs_k,
    plot_accumulation_vs_nc,
    plot_fp8_grid,
    plot_fp8_number_line,
    plot_fp8_vs_bf16,
    plot_scaling_granularity,
    plot_tile_scales,
)

__all__ = ["plot_group_routing", "plot_kv_cache", "plot_kv_vs_rank", "plot_params", "plot_rope_frequencies",
           "plot_yarn_ramp", "plot_accumulation_vs_bits", "plot_accumulation_vs_k", "plot_accumulation_vs_nc",
           "plot_fp8_grid", "plot_fp8_number_line", "plot_fp8_vs_bf16", "plot_scaling_granularity", "plot_tile_scales"]
