import pytest
import torch

import dsv3lab
from dsv3lab import PRESETS, ModelConfig
from helpers import random_tokens


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_on_meta(name):
    cfg = ModelConfig.preset(name)
    with torch.device("meta"):
        model = dsv3lab.DeepSeekV3(cfg)
    assert len(model.layers) == cfg.n_layers and len(model.mtp) == cfg.n_mtp
    assert sum(isinstance(b.ffn, dsv3lab.model.MoE) for b in model.layers) == cfg.n_moe_layers


def test_determinism_under_a_seed(tiny_cfg):
    a = dsv3lab.build_model(tiny_cfg, seed=3)
    b = dsv3lab.build_model(tiny_cfg, seed=3)
    c = dsv3lab.build_model(tiny_cfg, seed=4)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.embed.weight, c.embed.weight)
    tokens = random_tokens(tiny_cfg)
    _, la = a(tokens, tokens)
    _, lb = b(tokens, tokens)
    assert la["total"].item() == lb["total"].item()


def test_init_std_is_the_papers(tiny_cfg):
    cfg = ModelConfig.preset("toy")
    model = dsv3lab.build_model(cfg, seed=0)
    assert model.layers[1].ffn.experts.w1.std().item() == pytest.approx(0.006, rel=0.05)
    assert model.embed.weight.std().item() == pytest.approx(0.006, rel=0.05)
    assert torch.all(model.norm.weight == 1)


@pytest.mark.parametrize("attn_impl,moe_impl", [("naive", "loop"), ("absorb", "grouped")])
def test_every_parameter_that_should_learn_gets_a_gradient(tiny_cfg, attn_impl, moe_impl):
    model = dsv3lab.build_model(tiny_cfg.replace(attn_impl=attn_impl, moe_impl=moe_impl), seed=0)
    tokens = random_tokens(tiny_cfg, batch=4, seqlen=32)
    _, losses = model(tokens, tokens.roll(-1, 1))
    losses["total"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert all(not b.requires_grad for b in model.buffers())


def test_paths_agree_on_the_whole_model(tiny_model):
    tokens = random_tokens(tiny_model.cfg)
    ref, _ = tiny_model(tokens)
    other = dsv3lab.build_model(tiny_model.cfg.replace(attn_impl="absorb", moe_impl="grouped"))
    other.load_state_dict(tiny_model.state_dict())
    torch.testing.assert_close(other(tokens)[0], ref, atol=1e-5, rtol=1e-4)


def test_state_dict_has_weights_and_bias_but_no_rope_tables(tiny_model):
    keys = tiny_model.state_dict().keys()
    assert "layers.1.ffn.gate.bias" in keys and "mtp.0.block.ffn.gate.bias" in keys
    assert not any("rope" in k or "tokens_per_expert" in k for k in keys)


def test_bf16_model_keeps_rope_tables_and_bias_fp32(tiny_model):
    tiny_model.to(torch.bfloat16)
    assert tiny_model.rope_cos.dtype == torch.float32
    assert tiny_model.layers[1].ffn.gate.bias.dtype == torch.float32
    logits, _ = tiny_model(random_tokens(tiny_model.cfg))
    assert torch.isfinite(logits).all()


def test_bad_input_errors(tiny_model):
    cfg = tiny_model.cfg
    with pytest.raises(ValueError, match="outside the vocabulary.*vocab_size=512"):
        tiny_model(torch.tensor([[1, 2, 512]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="exceed max_seq_len=256"):
        tiny_model(torch.zeros(1, cfg.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, seqlen\]"):
        tiny_model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer ids"):
        tiny_model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="targets shape"):
        tiny_model(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


def test_aux_losses_only_in_training_and_weighted(tiny_cfg):
    cfg = tiny_cfg.replace(seq_aux_loss_alpha=1e-2)
    model = dsv3lab.build_model(cfg, seed=0)
    tokens = random_tokens(cfg)
    _, losses = model(tokens, tokens)
    assert losses["aux"].item() > 0 and losses["aux"].requires_grad
    # sum over MoE layers (main + MTP) of α · Σ f_i P_i, each ≈ α when balanced
    assert losses["aux"].item() == pytest.approx(1e-2 * len(model.moe_layers()), rel=0.5)
    model.eval()
    _, losses = model(tokens, tokens)
    assert losses["aux"].item() == 0
