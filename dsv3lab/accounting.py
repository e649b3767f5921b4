"""Parameter, FLOP and KV-cache accounting from a config alone (no weights needed).

Every count here is also checked against the model itself: ``sum(p.numel())`` of a meta-device model for
parameters, and ``torch.utils.flop_counter`` on a real forward for FLOPs (tests/test_accounting.py).

For DeepSeek-V3 (the 671B preset) this gives 671.0B parameters in the main model, 37.5B activated per token
(embedding and output head included), 11.6B in the MTP module, and a latent KV cache of 70,272 bytes per token
(BF16, all 61 layers) against 4.99 MB for materialised per-head K/V.

Paper: §4.2, Table 1 of DeepSeek-V2 (cache per token). Notebooks: 00_tour, 02_mla.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from .config import PRESETS, ModelConfig


def mla_params(cfg: ModelConfig) -> int:
    h, qk = cfg.n_heads, cfg.qk_head_dim
    if cfg.q_lora_rank:
        q = cfg.dim * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * qk  # wq_a, q_norm, wq_b
    else:
        q = cfg.dim * h * qk  # wq
    kv = cfg.dim * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank  # wkv_a, kv_norm
    kv += cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # wkv_b
    return q + kv + h * cfg.v_head_dim * cfg.dim  # + wo


def mlp_params(dim: int, inter: int) -> int:
    return 3 * dim * inter  # w1, w2, w3


def moe_params(cfg: ModelConfig, activated: bool = False) -> int:
    """Router + shared experts + routed experts (all, or only the K_r a token activates)."""
    n_routed = cfg.n_activated_experts if activated else cfg.n_routed_experts
    gate = cfg.n_routed_experts * cfg.dim
    shared = mlp_params(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else 0
    return gate + shared + n_routed * mlp_params(cfg.dim, cfg.moe_inter_dim)


def block_params(cfg: ModelConfig, layer_id: int, activated: bool = False) -> int:
    ffn = mlp_params(cfg.dim, cfg.inter_dim) if layer_id < cfg.n_dense_layers else moe_params(cfg, activated)
    return 2 * cfg.dim + mla_params(cfg) + ffn  # attn_norm + ffn_norm + MLA + FFN


def mtp_module_params(cfg: ModelConfig, activated: bool = False) -> int:
    """One MTP module without the shared embedding and head: enorm, hnorm, eh_proj, the block, its final norm."""
    return 2 * cfg.dim + 2 * cfg.dim * cfg.dim + block_params(cfg, cfg.n_layers, activated) + cfg.dim


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    embed = cfg.vocab_size * cfg.dim
    layers = sum(block_params(cfg, i) for i in range(cfg.n_layers))
    layers_act = sum(block_params(cfg, i, activated=True) for i in range(cfg.n_layers))
    return {
        "embedding": embed,
        "head": embed,
        "total_params": 2 * embed + layers + cfg.dim,  # + final norm; MTP excluded
        "activated_params": 2 * embed + layers_act + cfg.dim,  # embedding and head included
        "mtp_params": cfg.n_mtp * mtp_module_params(cfg),
        "mtp_activated_params": cfg.n_mtp * mtp_module_params(cfg, activated=True),
        "mla_per_layer": mla_params(cfg),
        "dense_mlp_per_layer": mlp_params(cfg.dim, cfg.inter_dim),
        "expert": mlp_params(cfg.dim, cfg.moe_inter_dim),
        "moe_per_layer": moe_params(cfg) if cfg.n_routed_experts else 0,
    }


# ---------------------------------------------------------------------- KV cache
def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> dict[str, int]:
    """Whole-model cache per token: ``latent`` (absorbed MLA: d_c + d_h^R per layer) vs ``materialized`` (naive
    MLA: per-head K of width d_h + d_h^R and V of width d_v)."""
    latent = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.n_layers * bytes_per_value
    materialized = cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.n_layers * bytes_per_value
    return {"latent": latent, "materialized": materialized}


def kv_cache_comparison(cfg: ModelConfig, gqa_groups: int = 8, bytes_per_value: int = 2) -> dict[str, int]:
    """Bytes per token for attention variants with the same number of heads n_h and head width d_h = qk_nope_head_dim
    (DeepSeek-V2 Table 1): MHA 2·n_h·d_h, GQA 2·n_g·d_h, MQA 2·d_h, MLA d_c + d_h^R, per layer."""
    d_h, layers = cfg.qk_nope_head_dim, cfg.n_layers
    groups = min(gqa_groups, cfg.n_heads)
    per_layer = {
        "MHA": 2 * cfg.n_heads * d_h,
        "GQA": 2 * groups * d_h,  # n_g = min(gqa_groups, n_h)
        "MQA": 2 * d_h,
        "MLA (latent)": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
    }
    return {k: v * layers * bytes_per_value for k, v in per_layer.items()}


def mla_attention_macs(cfg: ModelConfig, s: int, t: int) -> dict[str, int]:
    """Multiply-accumulates of one MLA layer's attention for ``s`` queries over ``t`` keys (the projections both
    paths share — wq, wkv_a, wo — left out), and the cache values each path reads:

    * ``absorb``       latent cache, W_UK folded into the query, W_UV after attention:
                       s·h·d_h·d_c + s·h·t·(d_c + d_h^R) + s·h·t·d_c + s·h·d_c·d_v
    * ``expand``       latent cache, every cached latent up-projected to per-head K/V (what transformers does):
                       t·h·d_c·(d_h + d_v) + s·h·t·(d_h + d_h^R + d_v)
    * ``naive_cached`` per-head K/V cache: only the s new tokens are up-projected:
                       s·h·d_c·(d_h + d_v) + s·h·t·(d_h + d_h^R + d_v)

    Absorption pays when few queries meet many cached keys (decode, s = 1); up-projecting pays when s ≈ t (prefill).
    """
    h, c, r, dh, dv = cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    attend = s * h * t * (dh + r + dv)
    return {
        "absorb": s * h * dh * c + s * h * t * (c + r) + s * h * t * c + s * h * c * dv,
        "expand": t * h * c * (dh + dv) + attend,
        "naive_cached": s * h * c * (dh + dv) + attend,
        "cache_values_read_latent": t * (c + r),
        "cache_values_read_naive": t * h * (dh + r + dv),
    }


def max_context(
    cfg: ModelConfig, budget_bytes: float, batch_size: int = 1, latent: bool = True, bytes_per_value: int = 2
) -> int:
    """The longest context whose KV cache for ``batch_size`` sequences fits ``budget_bytes``."""
    per_token = kv_cache_bytes_per_token(cfg, bytes_per_value)["latent" if latent else "materialized"]
    return int(budget_bytes // (per_token * batch_size))


# ---------------------------------------------------------------------- FLOPs
def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights a token multiplies with in the main model: activated parameters minus the embedding lookup and norms."""
    pc = param_counts(cfg)
    norms = cfg.n_layers * 2 * cfg.dim + cfg.dim
    norms += cfg.n_layers * (cfg.kv_lora_rank + (cfg.q_lora_rank if cfg.q_lora_rank else 0))
    return pc["activated_params"] - pc["embedding"] - norms


def mtp_matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights a token multiplies with in one MTP module: ``eh_proj`` (2d → d), its block's activated projections and
    router, and the shared output head (norms and the shared embedding lookup left out)."""
    block = block_params(cfg, cfg.n_layers, activated=True)
    block -= 2 * cfg.dim + cfg.kv_lora_rank + (cfg.q_lora_rank if cfg.q_lora_rank else 0)  # its norms
    return 2 * cfg.dim * cfg.dim + block + cfg.vocab_size * cfg.dim


def _attention_flops(cfg: ModelConfig, n_layers: int, seq_len: int, causal: bool) -> float:
    t = seq_len / 2 if causal else seq_len  # keys a query sees on average
    return 2 * n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * t


def flops_per_token(
    cfg: ModelConfig, seq_len: int | None = None, training: bool = True, causal: bool = True, mtp: bool = False
) -> float:
    """FLOPs per token of the main model at sequence length ``seq_len`` (default min(4096, max_seq_len)).

    forward = 2 · (weights a token multiplies with) + attention 2 · n_layers · n_h · (d_h + d_h^R + d_v) · t, with
    t = seq_len / 2 keys on average under the causal mask (seq_len without it). Training = 3 × forward. With
    ``mtp=True`` the D multi-token-prediction modules are added (each: ``eh_proj``, one block, the shared head),
    which training computes as well (§2.2).
    """
    seq_len = seq_len or min(4096, cfg.max_seq_len)
    fwd = 2 * matmul_params_per_token(cfg) + _attention_flops(cfg, cfg.n_layers, seq_len, causal)
    if mtp:
        fwd += cfg.n_mtp * (2 * mtp_matmul_params_per_token(cfg) + _attention_flops(cfg, 1, seq_len, causal))
    return 3 * fwd if training else fwd


def model_stats(cfg: ModelConfig) -> dict[str, Any]:
    """What ``dsv3lab info`` prints: parameters, activated, MTP, KV-cache bytes per token (BF16) and FLOPs/token."""
    pc = param_counts(cfg)
    seq_len = min(4096, cfg.max_seq_len)
    return {
        "preset": cfg.name,
        "total_params": pc["total_params"],
        "activated_params": pc["activated_params"],
        "mtp_params": pc["mtp_params"],
        "mtp_activated_params": pc["mtp_activated_params"],
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg),
        "flops_per_token": flops_per_token(cfg, seq_len),
        "flops_per_token_note": f"training (forward + backward) FLOPs of the main model at sequence length "
        f"{seq_len}, causal attention",
        "breakdown": {
            k: v
            for k, v in pc.items()
            if k not in ("total_params", "activated_params", "mtp_params", "mtp_activated_params")
        },
    }


def preset_table() -> pd.DataFrame:
    """One row per preset: parameters, activated parameters, MTP parameters, KV-cache bytes per token, FLOPs per
    token (analytic; ``dsv3lab reproduce --only tour`` cross-checks the totals against models built on meta)."""
    rows = []
    for name in PRESETS:
        cfg = ModelConfig.preset(name)
        stats = model_stats(cfg)
        rows.append(
            {
                "preset": name,
                "total_params": stats["total_params"],
                "activated_params": stats["activated_params"],
                "mtp_params": stats["mtp_params"],
                "kv_latent_bytes_per_token": stats["kv_cache_bytes_per_token"]["latent"],
                "kv_materialized_bytes_per_token": stats["kv_cache_bytes_per_token"]["materialized"],
                "flops_per_token": stats["flops_per_token"],
                "layers": cfg.n_layers,
                "dim": cfg.dim,
                "routed_experts": cfg.n_routed_experts,
                "activated_experts": cfg.n_activated_experts,
            }
        )
    return pd.DataFrame(rows)


def kv_table() -> pd.DataFrame:
    """Bytes per token of MLA's latent cache against MHA/GQA/MQA with the same heads, one row per preset and variant."""
    rows = []
    for name in PRESETS:
        for variant, nbytes in kv_cache_comparison(ModelConfig.preset(name)).items():
            rows.append({"preset": name, "variant": variant, "bytes_per_token": nbytes})
    return pd.DataFrame(rows)
