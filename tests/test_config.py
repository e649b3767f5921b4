import json

import pytest

from dsv3lab import PRESETS, ModelConfig
from dsv3lab.infer.hf import config_from_hf, config_to_hf


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates_and_round_trips_through_hf(name):
    cfg = ModelConfig.preset(name)
    back = config_from_hf(json.loads(json.dumps(config_to_hf(cfg))))
    for f in ModelConfig.field_names():
        if f in (
            "name",
            "aux_loss_alpha",
            "seq_aux_loss_alpha",
            "mtp_lambda",
            "attn_impl",
            "moe_impl",
            "init_std",
            "max_batch_size",
        ):
            continue
        if f in ("rope_factor", "original_seq_len", "beta_fast", "beta_slow", "mscale") and not cfg.yarn_enabled:
            continue  # without YaRN these fields have no effect and are not written
        assert getattr(back, f) == getattr(cfg, f), f


def test_671b_is_the_official_config():
    cfg = ModelConfig.preset("671B")
    assert (cfg.dim, cfg.n_layers, cfg.n_dense_layers, cfg.n_heads) == (7168, 61, 3, 128)
    assert (cfg.n_routed_experts, cfg.n_shared_experts, cfg.n_activated_experts) == (256, 1, 8)
    assert (cfg.n_expert_groups, cfg.n_limited_groups, cfg.route_scale, cfg.score_func) == (8, 4, 2.5, "sigmoid")
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim) == (1536, 512, 128, 64)
    assert cfg.n_mtp == 1 and cfg.gate_bias and cfg.vocab_size == 129280 and cfg.inter_dim == 18432


def test_from_hf_reads_the_official_v3_config_json():
    hf = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "n_shared_experts": 1,
        "n_routed_experts": 256,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "topk_method": "noaux_tc",
        "n_group": 8,
        "topk_group": 4,
        "num_experts_per_tok": 8,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 3,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "aux_loss_alpha": 0.001,
        "seq_aux": True,
        "hidden_act": "silu",
        "max_position_embeddings": 163840,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-06,
        "use_cache": True,
        "rope_theta": 10000,
        "num_nextn_predict_layers": 1,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        },
    }
    cfg = config_from_hf(hf)
    ref = ModelConfig.preset("671B")
    for f in (
        "dim",
        "n_layers",
        "n_dense_layers",
        "n_routed_experts",
        "n_expert_groups",
        "n_limited_groups",
        "q_lora_rank",
        "route_scale",
        "score_func",
        "gate_bias",
        "n_mtp",
        "rope_factor",
        "original_seq_len",
    ):
        assert getattr(cfg, f) == getattr(ref, f), f
    assert cfg.max_seq_len == 163840
    assert cfg.softmax_scale == pytest.approx(ref.softmax_scale)
    # newer transformers write rope_parameters instead of rope_scaling
    hf2 = dict(hf, rope_parameters=dict(hf.pop("rope_scaling"), rope_type="yarn", rope_theta=10000.0))
    hf2.pop("rope_scaling", None)
    assert config_from_hf(hf2).rope_factor == 40


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(n_expert_groups=3), "n_expert_groups"),  # 8 experts not divisible into 3 groups
        (dict(n_limited_groups=5), "n_limited_groups"),  # more kept groups than groups
        (dict(n_limited_groups=1, n_activated_experts=3), "n_activated_experts"),  # kept groups hold 2 < 3
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(score_func="relu"), "score_func"),
        (dict(attn_impl="flash"), "attn_impl"),
        (dict(moe_impl="fused"), "moe_impl"),
        (dict(n_dense_layers=3), "n_dense_layers"),
        (dict(n_activated_experts=9), "n_activated_experts"),
        (dict(dim=0), "dim"),
        (dict(beta_fast=1), "beta_fast"),
        (dict(init_std=0.0), "init_std"),
        (dict(n_mtp=-1), "n_mtp"),
        (dict(eos_token_id=512), "eos_token_id"),
    ],
)
def test_invalid_combinations_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.preset("tiny", **change)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="tiny, toy, small, 16B, 236B, 671B"):
        ModelConfig.preset("67B")


def test_unknown_key_suggests_close_matches():
    cfg = ModelConfig.preset("tiny")
    with pytest.raises(ValueError, match="n_routed_experts"):
        cfg.replace(n_routed_expert=4)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        cfg.with_overrides(["kv_lora_rnk=8"])


def test_overrides_parse_by_field_type():
    cfg = ModelConfig.preset("tiny").with_overrides(
        ["n_mtp=2", "gate_bias=false", "route_scale=1.5", "attn_impl=absorb"]
    )
    assert (cfg.n_mtp, cfg.gate_bias, cfg.route_scale, cfg.attn_impl) == (2, False, 1.5, "absorb")
    with pytest.raises(ValueError, match="integer"):
        ModelConfig.preset("tiny").with_overrides(["n_mtp=two"])


def test_from_hf_rejects_what_it_cannot_represent():
    hf = config_to_hf(ModelConfig.preset("tiny"))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        config_from_hf(dict(hf, num_key_value_heads=2))
    with pytest.raises(ValueError, match="architecture"):
        config_from_hf(dict(hf, architectures=["LlamaForCausalLM"], model_type="llama"))
    bad_rope = dict(hf["rope_scaling"], mscale=0.5)
    with pytest.raises(ValueError, match="mscale"):
        config_from_hf(dict(hf, rope_scaling=bad_rope))
