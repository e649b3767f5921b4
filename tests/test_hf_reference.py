"""The model against transformers' DeepseekV3ForCausalLM with the same random weights (mapped in memory).

Checkpoint files in the official layout (and their loading) are tested in the inference/checkpoint tests; this test
pins the architecture itself: MLA with YaRN, group-limited sigmoid routing with a non-zero correction bias, shared
experts, dense first layers.
"""

import pytest
import torch
from helpers import random_tokens

import dsv3lab
from dsv3lab.model import MLP

transformers = pytest.importorskip("transformers")  # the `hf` extra, installed by `make setup`


def hf_model_with_our_weights(model: dsv3lab.DeepSeekV3):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf_cfg = model.cfg.to_hf()
    rope = hf_cfg.pop("rope_scaling")
    keep = set(DeepseekV3Config.__dataclass_fields__) if hasattr(DeepseekV3Config, "__dataclass_fields__") else None
    kwargs = {k: v for k, v in hf_cfg.items() if keep is None or k in keep}
    kwargs["rope_parameters"] = dict(rope, rope_theta=model.cfg.rope_theta) if rope else None
    config = DeepseekV3Config(**kwargs)
    config._attn_implementation = "eager"
    hf = DeepseekV3ForCausalLM(config).eval()
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.head.weight}  # fmt: skip
    for i, block in enumerate(model.layers):
        p, a = f"model.layers.{i}.", block.attn
        sd.update({
            p + "input_layernorm.weight": block.attn_norm.weight,
            p + "post_attention_layernorm.weight": block.ffn_norm.weight,
            p + "self_attn.q_a_proj.weight": a.wq_a.weight,
            p + "self_attn.q_a_layernorm.weight": a.q_norm.weight,
            p + "self_attn.q_b_proj.weight": a.wq_b.weight,
            p + "self_attn.kv_a_proj_with_mqa.weight": a.wkv_a.weight,
            p + "self_attn.kv_a_layernorm.weight": a.kv_norm.weight,
            p + "self_attn.kv_b_proj.weight": a.wkv_b.weight,
            p + "self_attn.o_proj.weight": a.wo.weight,
        })  # fmt: skip
        f = block.ffn
        if isinstance(f, MLP):
            sd.update({p + "mlp.gate_proj.weight": f.w1.weight, p + "mlp.up_proj.weight": f.w3.weight,
                       p + "mlp.down_proj.weight": f.w2.weight})  # fmt: skip
        else:
            s = f.shared_experts
            sd.update({
                p + "mlp.gate.weight": f.gate.weight,
                p + "mlp.gate.e_score_correction_bias": f.gate.bias,
                p + "mlp.experts.gate_up_proj": torch.cat([f.experts.w1, f.experts.w3], dim=1),
                p + "mlp.experts.down_proj": f.experts.w2,
                p + "mlp.shared_experts.gate_proj.weight": s.w1.weight,
                p + "mlp.shared_experts.up_proj.weight": s.w3.weight,
                p + "mlp.shared_experts.down_proj.weight": s.w2.weight,
            })  # fmt: skip
    result = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return hf


@pytest.mark.parametrize("attn_impl,moe_impl", [("naive", "loop"), ("absorb", "grouped")])
def test_logits_equal_transformers(tiny_model, attn_impl, moe_impl):
    model = dsv3lab.build_model(tiny_model.cfg.replace(attn_impl=attn_impl, moe_impl=moe_impl))
    model.load_state_dict(tiny_model.state_dict())
    model.eval()
    assert model.cfg.yarn_enabled and model.cfg.n_expert_groups > 1
    hf = hf_model_with_our_weights(model)
    tokens = random_tokens(model.cfg, batch=2, seqlen=48)
    with torch.no_grad():
        ours, _ = model(tokens)
        ref = hf(tokens).logits
    assert (ours - ref).abs().max().item() <= 1e-4
