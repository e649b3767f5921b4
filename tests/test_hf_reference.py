"""The model against transformers' DeepseekV3ForCausalLM with the same random weights (mapped in memory).

Checkpoint *files* in the official layout are tested with the checkpoint code; this test pins the architecture:
MLA with YaRN, group-limited sigmoid routing with a non-zero correction bias, shared experts, dense first layers.
"""

import pytest
import torch

import dsv3lab
from helpers import random_tokens

pytest.importorskip("transformers")  # the `hf` extra, installed by `make setup`


@pytest.mark.parametrize("attn_impl,moe_impl,hf_attn", [("naive", "loop", "eager"), ("absorb", "grouped", "sdpa")])
def test_logits_equal_transformers(tiny_model, attn_impl, moe_impl, hf_attn):
    from dsv3lab.infer.hf import to_transformers

    model = dsv3lab.build_model(tiny_model.cfg.replace(attn_impl=attn_impl, moe_impl=moe_impl))
    model.load_state_dict(tiny_model.state_dict())
    model.eval()
    assert model.cfg.yarn_enabled and model.cfg.n_expert_groups > 1
    assert model.layers[1].ffn.gate.bias.abs().sum() > 0
    hf = to_transformers(model, hf_attn)
    tokens = random_tokens(model.cfg, batch=2, seqlen=48)
    with torch.no_grad():
        ours, _ = model(tokens)
        ref = hf(tokens).logits
    assert (ours - ref).abs().max().item() <= 1e-4


def test_plain_query_projection_equals_transformers():
    cfg = dsv3lab.ModelConfig.preset("tiny", q_lora_rank=0)
    model = dsv3lab.build_model(cfg, seed=1).eval()
    from dsv3lab.infer.hf import to_transformers

    tokens = random_tokens(cfg, batch=1, seqlen=20)
    with torch.no_grad():
        assert (model(tokens)[0] - to_transformers(model)(tokens).logits).abs().max().item() <= 1e-4
