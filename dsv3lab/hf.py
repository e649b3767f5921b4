"""A bridge to transformers' ``DeepseekV3ForCausalLM``: the same weights in the reference implementation.

Used by the parity tests and the speed benchmarks (transformers is the ``hf`` extra). Checkpoint *files* in the
official layout are handled by the checkpoint code; this module maps an in-memory model.
"""

from __future__ import annotations

from typing import Any

import torch

from .model import DeepSeekV3
from .model.norm import MLP


def transformers_config(cfg_hf: dict[str, Any]):
    """A ``DeepseekV3Config`` from our ``ModelConfig.to_hf()`` dict (YaRN passed as ``rope_parameters``)."""
    from transformers import DeepseekV3Config

    hf = dict(cfg_hf)
    rope = hf.pop("rope_scaling", None)
    known = getattr(DeepseekV3Config, "__dataclass_fields__", None)
    kwargs = {k: v for k, v in hf.items() if known is None or k in known}
    kwargs["rope_parameters"] = dict(rope, rope_theta=hf["rope_theta"]) if rope else None
    return DeepseekV3Config(**kwargs)


def to_transformers(model: DeepSeekV3, attn_implementation: str = "sdpa"):
    """A transformers ``DeepseekV3ForCausalLM`` holding copies of ``model``'s main weights (MTP is not supported
    by transformers' model and is left out). Experts use transformers' fused layout (``gate_up_proj``)."""
    from transformers import DeepseekV3ForCausalLM

    config = transformers_config(model.cfg.to_hf())
    config._attn_implementation = attn_implementation
    with torch.device(model.embed.weight.device):
        hf = DeepseekV3ForCausalLM(config)
    sd = {
        "model.embed_tokens.weight": model.embed.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.head.weight,
    }
    for i, block in enumerate(model.layers):
        p, a = f"model.layers.{i}.", block.attn
        sd[p + "input_layernorm.weight"] = block.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        if model.cfg.q_lora_rank:
            sd[p + "self_attn.q_a_proj.weight"] = a.wq_a.weight
            sd[p + "self_attn.q_a_layernorm.weight"] = a.q_norm.weight
            sd[p + "self_attn.q_b_proj.weight"] = a.wq_b.weight
        else:
            sd[p + "self_attn.q_proj.weight"] = a.wq.weight
        sd[p + "self_attn.kv_a_proj_with_mqa.weight"] = a.wkv_a.weight
        sd[p + "self_attn.kv_a_layernorm.weight"] = a.kv_norm.weight
        sd[p + "self_attn.kv_b_proj.weight"] = a.wkv_b.weight
        sd[p + "self_attn.o_proj.weight"] = a.wo.weight
        f = block.ffn
        if isinstance(f, MLP):
            sd[p + "mlp.gate_proj.weight"] = f.w1.weight
            sd[p + "mlp.up_proj.weight"] = f.w3.weight
            sd[p + "mlp.down_proj.weight"] = f.w2.weight
            continue
        sd[p + "mlp.gate.weight"] = f.gate.weight
        if f.gate.bias is not None:
            sd[p + "mlp.gate.e_score_correction_bias"] = f.gate.bias
        sd[p + "mlp.experts.gate_up_proj"] = torch.cat([f.experts.w1, f.experts.w3], dim=1)  # [E, 2I, D]
        sd[p + "mlp.experts.down_proj"] = f.experts.w2  # [E, D, I]
        if f.shared_experts is not None:
            s = f.shared_experts
            sd[p + "mlp.shared_experts.gate_proj.weight"] = s.w1.weight
            sd[p + "mlp.shared_experts.up_proj.weight"] = s.w3.weight
            sd[p + "mlp.shared_experts.down_proj.weight"] = s.w2.weight
    hf.load_state_dict(sd, strict=True)  # copies
    return hf.to(model.embed.weight.dtype).eval()
