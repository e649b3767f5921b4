"""The MLA attention cost model (absorbed vs up-projected vs per-head K/V cache) against torch's FLOP counter, and
the choice a latent cache makes between them."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dsv3lab
from dsv3lab.accounting import mla_attention_macs
from dsv3lab.model import MLA


def _measured_macs(attn, cfg, s, t, layout):
    """MACs of one MLA forward of s new tokens after t - s cached ones, minus the shared projections."""
    cache = attn.new_cache(1, t, layout=layout)
    cos, sin = torch.ones(t, cfg.qk_rope_head_dim // 2), torch.zeros(t, cfg.qk_rope_head_dim // 2)
    with torch.no_grad():
        if t > s:
            attn(torch.randn(1, t - s, cfg.dim), 0, cos[: t - s], sin[: t - s], cache)
        with FlopCounterMode(display=False) as counter:
            attn(torch.randn(1, s, cfg.dim), t - s, cos[t - s :], sin[t - s :], cache)
    shared = s * (
        cfg.dim * cfg.q_lora_rank
        + cfg.q_lora_rank * cfg.n_heads * cfg.qk_head_dim
        + cfg.dim * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        + cfg.n_heads * cfg.v_head_dim * cfg.dim
    )
    return counter.get_total_flops() // 2 - shared


@pytest.mark.parametrize(
    "s,t,layout,path",
    [
        (1, 40, "latent", "absorb"),  # decode on the latent: absorbed
        (32, 32, "latent", "expand"),  # prefill on the latent: up-projected once
        (1, 40, "per_head", "naive_cached"),  # decode on per-head K/V
        (12, 40, "per_head", "naive_cached"),
    ],
)
def test_cost_model_matches_the_flop_counter(s, t, layout, path):
    cfg = dsv3lab.ModelConfig.preset("tiny")
    attn = MLA(cfg)
    attn.init_weights(0.02)
    macs = mla_attention_macs(cfg, s, t)
    assert _measured_macs(attn, cfg, s, t, layout) == macs[path]
    assert attn.attention_path(s, t, attn.new_cache(1, t, layout=layout)) == path.removesuffix("_cached")
    if layout == "latent":  # the latent cache takes the cheaper of its two paths
        assert macs[path] == min(macs["absorb"], macs["expand"])


def test_a_model_configured_absorb_always_computes_absorbed():
    cfg = dsv3lab.ModelConfig.preset("tiny", attn_impl="absorb")
    attn = MLA(cfg)
    attn.init_weights(0.02)
    assert _measured_macs(attn, cfg, 32, 32, "latent") == mla_attention_macs(cfg, 32, 32)["absorb"]


def test_671b_absorption_pays_at_decode_not_at_prefill():
    cfg = dsv3lab.ModelConfig.preset("671B")
    decode, prefill = mla_attention_macs(cfg, 1, 4096), mla_attention_macs(cfg, 4096, 4096)
    assert decode["absorb"] * 50 < decode["expand"]  # re-expanding 4096 latents for one query is very wasteful
    assert prefill["expand"] < prefill["absorb"]
    assert decode["cache_values_read_naive"] / decode["cache_values_read_latent"] == pytest.approx(40960 / 576)
