import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dsv3lab
from dsv3lab import PRESETS, ModelConfig
from dsv3lab.accounting import flops_per_token, kv_cache_bytes_per_token, max_context, model_stats


@pytest.mark.parametrize("name", list(PRESETS))
def test_analytic_counts_equal_the_built_model_on_meta(name):
    cfg = ModelConfig.preset(name)
    with torch.device("meta"):
        model = dsv3lab.DeepSeekV3(cfg)
    stats = model_stats(cfg)
    assert model.num_params() == stats["total_params"]
    assert sum(p.numel() for p in model.mtp.parameters()) == stats["mtp_params"]
    assert all(p.is_meta for p in model.parameters())


def test_671b_numbers():
    stats = model_stats(ModelConfig.preset("671B"))
    assert stats["total_params"] == pytest.approx(671.0e9, rel=0.005)
    assert stats["activated_params"] == pytest.approx(37.5e9, rel=0.01)
    assert stats["mtp_params"] == pytest.approx(11.6e9, rel=0.01)
    kv = stats["kv_cache_bytes_per_token"]
    assert kv["latent"] == 70_272
    assert kv["materialized"] / kv["latent"] == pytest.approx(71.1, abs=0.1)


def test_smaller_official_presets():
    assert model_stats(ModelConfig.preset("16B"))["total_params"] == pytest.approx(15.71e9, rel=0.002)
    assert model_stats(ModelConfig.preset("236B"))["total_params"] == pytest.approx(235.7e9, rel=0.002)
    assert 1e8 <= model_stats(ModelConfig.preset("small"))["total_params"] <= 3e8
    assert model_stats(ModelConfig.preset("tiny"))["total_params"] < 1e6


def test_activated_count_equals_parameters_a_token_touches(tiny_model):
    """Count the parameters a single token's forward actually reads: everything except unchosen experts."""
    cfg = tiny_model.cfg
    per_expert = 3 * cfg.dim * cfg.moe_inter_dim
    unchosen = cfg.n_moe_layers * (cfg.n_routed_experts - cfg.n_activated_experts) * per_expert
    assert model_stats(cfg)["activated_params"] == tiny_model.num_params() - unchosen


def test_forward_flops_match_torch_flop_counter():
    cfg = ModelConfig.preset("tiny", n_mtp=0)
    model = dsv3lab.build_model(cfg, seed=0).eval()
    seqlen = 32
    tokens = torch.randint(0, cfg.vocab_size, (1, seqlen))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(tokens)
    measured = counter.get_total_flops() / seqlen
    # the counter counts every expert matmul actually run (K_r per token) and full (non-causal) SDPA
    expected = flops_per_token(cfg, seq_len=seqlen, training=False, causal=False)
    router = 2 * cfg.n_routed_experts * cfg.dim * cfg.n_moe_layers  # counted by both
    assert measured == pytest.approx(expected, rel=0.02), (measured, expected, router)


def test_mtp_flops_match_torch_flop_counter():
    """With targets the model also runs its MTP module (on T - 1 positions): flops_per_token(mtp=True) counts it."""
    cfg = ModelConfig.preset("tiny")
    model = dsv3lab.build_model(cfg, seed=0).eval()
    seqlen = 32
    tokens = torch.randint(0, cfg.vocab_size, (1, seqlen))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(tokens, tokens.roll(-1, 1))
    main = flops_per_token(cfg, seq_len=seqlen, training=False, causal=False)
    mtp = flops_per_token(cfg, seq_len=seqlen - 1, training=False, causal=False, mtp=True)
    mtp -= flops_per_token(cfg, seq_len=seqlen - 1, training=False, causal=False)
    expected = seqlen * main + (seqlen - 1) * mtp
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.02)
    assert mtp > 0.1 * main  # the MTP module is a real share at this size, so a missing term would fail


def test_max_context_fits_the_budget():
    cfg = ModelConfig.preset("671B")
    n = max_context(cfg, budget_bytes=80e9)
    per = kv_cache_bytes_per_token(cfg)["latent"]
    assert n * per <= 80e9 < (n + 1) * per
