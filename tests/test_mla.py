import pytest
import torch

import dsv3lab
from dsv3lab import ModelConfig
from dsv3lab.model import MLA
from helpers import random_tokens


def _pair(cfg, **changes):
    torch.manual_seed(0)
    naive = MLA(cfg.replace(attn_impl="naive", **changes))
    naive.init_weights(0.05)
    absorb = MLA(cfg.replace(attn_impl="absorb", **changes))
    absorb.load_state_dict(naive.state_dict())
    return naive, absorb


@pytest.mark.parametrize("q_lora_rank", [32, 0])
def test_naive_equals_absorb_prefill(tiny_cfg, q_lora_rank):
    naive, absorb = _pair(tiny_cfg, q_lora_rank=q_lora_rank)
    model = dsv3lab.build_model(tiny_cfg)
    x = torch.randn(2, 20, tiny_cfg.dim)
    cos, sin = model.rope(0, 20)
    torch.testing.assert_close(naive(x, 0, cos, sin), absorb(x, 0, cos, sin), atol=1e-5, rtol=1e-4)


def test_naive_and_absorb_have_equal_gradients(tiny_cfg):
    """Training may use either path: the gradients of the input and of every weight agree."""
    naive, absorb = _pair(tiny_cfg)
    cos, sin = dsv3lab.build_model(tiny_cfg).rope(0, 20)
    x = torch.randn(2, 20, tiny_cfg.dim)
    g = torch.randn(2, 20, tiny_cfg.dim)
    grads = []
    for mla in (naive, absorb):
        xi = x.clone().requires_grad_()
        (mla(xi, 0, cos, sin) * g).sum().backward()
        grads.append([xi.grad] + [p.grad for p in mla.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_cached_decoding_equals_full_recomputation(tiny_model, impl):
    cfg = tiny_model.cfg.replace(attn_impl=impl)
    model = dsv3lab.build_model(cfg)
    model.load_state_dict(tiny_model.state_dict())
    model.eval()
    tokens = random_tokens(cfg, batch=2, seqlen=20)
    with torch.no_grad():
        full, _ = model(tokens)
        cache = model.new_cache(batch_size=2, max_len=32)
        steps = [model(tokens[:, :7], start_pos=0, cache=cache)[0]]  # prefill 7 tokens
        steps.append(model(tokens[:, 7:10], start_pos=7, cache=cache)[0])  # a chunk of 3
        for i in range(10, 20):  # then token by token
            steps.append(model(tokens[:, i : i + 1], start_pos=i, cache=cache)[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_naive_and_absorb_decode_to_the_same_logits(tiny_model):
    outs = {}
    tokens = random_tokens(tiny_model.cfg, batch=1, seqlen=12)
    for impl in ("naive", "absorb"):
        model = dsv3lab.build_model(tiny_model.cfg.replace(attn_impl=impl))
        model.load_state_dict(tiny_model.state_dict())
        model.eval()
        cache = model.new_cache(1, 16)
        with torch.no_grad():
            model(tokens[:, :4], start_pos=0, cache=cache)
            outs[impl] = torch.cat([model(tokens[:, i : i + 1], start_pos=i, cache=cache)[0] for i in range(4, 12)], 1)
    torch.testing.assert_close(outs["naive"], outs["absorb"], atol=1e-5, rtol=1e-4)


def test_latent_cache_holds_only_the_latent_and_rope_key(tiny_cfg):
    cfg = tiny_cfg.replace(attn_impl="absorb")
    model = dsv3lab.build_model(cfg)
    cache = model.new_cache(batch_size=1, max_len=100, dtype=torch.bfloat16)
    per_token = cache.nbytes / 100
    assert per_token == dsv3lab.accounting.kv_cache_bytes_per_token(cfg)["latent"]
    naive = dsv3lab.build_model(cfg.replace(attn_impl="naive")).new_cache(1, 100, dtype=torch.bfloat16)
    assert naive.nbytes / 100 == dsv3lab.accounting.kv_cache_bytes_per_token(cfg)["materialized"]


def test_cache_holds_kv_norm_latent_and_roped_key(tiny_model):
    """The absorbed cache stores kv_norm(c_KV) and k^R after RoPE (as the official code does)."""
    cfg = tiny_model.cfg.replace(attn_impl="absorb")
    model = dsv3lab.build_model(cfg)
    model.load_state_dict(tiny_model.state_dict())
    tokens = random_tokens(cfg, batch=1, seqlen=6)
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(tokens, cache=cache)
        attn = model.layers[0].attn
        x = model.layers[0].attn_norm(model.embed(tokens))
        kv, k_pe = attn.wkv_a(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        cos, sin = model.rope(0, 6)
        torch.testing.assert_close(cache.layers[0].kv[:, :6], attn.kv_norm(kv))
        from dsv3lab.model.rope import apply_rope

        torch.testing.assert_close(cache.layers[0].pe[:, :6], apply_rope(k_pe, cos, sin))


def test_cache_position_past_its_size_is_an_error(tiny_model):
    cache = tiny_model.new_cache(batch_size=1, max_len=8)
    with torch.no_grad(), pytest.raises(ValueError, match="past the cache size 8"):
        tiny_model(random_tokens(tiny_model.cfg, 1, 10), cache=cache)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        tiny_model.new_cache(1, tiny_model.cfg.max_seq_len + 1)


def test_671b_mla_shapes_on_meta():
    with torch.device("meta"):
        attn = MLA(ModelConfig.preset("671B"))
    assert tuple(attn.wq_a.weight.shape) == (1536, 7168)
    assert tuple(attn.wq_b.weight.shape) == (128 * 192, 1536)
    assert tuple(attn.wkv_a.weight.shape) == (512 + 64, 7168)
    assert tuple(attn.wkv_b.weight.shape) == (128 * 256, 512)
    assert tuple(attn.wo.weight.shape) == (7168, 128 * 128)


def test_a_naive_model_decodes_with_the_latent_cache(tiny_model):
    """The cache layout selects the path: a model trained with attn_impl='naive' decodes from the latent cache."""
    assert tiny_model.cfg.attn_impl == "naive"
    tiny_model.eval()
    tokens = random_tokens(tiny_model.cfg, batch=1, seqlen=10)
    with torch.no_grad():
        full, _ = tiny_model(tokens)
        cache = tiny_model.new_cache(1, 16, layout="latent")
        assert cache.layers[0].layout == "latent" and hasattr(cache.layers[0], "kv")
        assert tiny_model.layers[0].attn.attention_path(1, 10, cache.layers[0]) == "absorb"
        steps = [tiny_model(tokens[:, :3], cache=cache)[0]]
        steps += [tiny_model(tokens[:, i : i + 1], start_pos=i, cache=cache)[0] for i in range(3, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_the_old_cache_spelling_still_works_with_a_deprecation_warning(tiny_model):
    with pytest.warns(DeprecationWarning, match="layout='latent'"):
        old = tiny_model.new_cache(1, 8, attn_impl="absorb")
    assert [c.layout for c in old.layers] == ["latent"] * tiny_model.cfg.n_layers
    with pytest.warns(DeprecationWarning, match="layout='per_head'"):
        assert tiny_model.new_cache(1, 8, attn_impl="naive").layers[0].layout == "per_head"
    with pytest.raises(ValueError, match="cache layout must be one of"):
        tiny_model.new_cache(1, 8, layout="absorb")
    with pytest.raises(ValueError, match="give the cache layout once"):
        tiny_model.new_cache(1, 8, layout="latent", attn_impl="absorb")


def test_attention_path_rule(tiny_cfg):
    naive, absorb = MLA(tiny_cfg), MLA(tiny_cfg.replace(attn_impl="absorb"))
    latent, per_head = naive.new_cache(1, 64, layout="latent"), naive.new_cache(1, 64, layout="per_head")
    assert naive.attention_path(16, 16, None) == "naive" and absorb.attention_path(16, 16, None) == "absorb"
    assert naive.attention_path(1, 64, per_head) == "naive" and absorb.attention_path(8, 64, per_head) == "naive"
    assert naive.attention_path(1, 64, latent) == "absorb"  # decode: absorbed
    assert naive.attention_path(64, 64, latent) == "expand"  # prefill: up-project the latents once
    assert absorb.attention_path(64, 64, latent) == "absorb"  # a model configured absorb never expands
