"""Checkpoints in the official Hugging Face layout: transformers both ways, MTP, FP8 blocks, RoPE layout, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3lab
from dsv3lab.infer import CheckpointError, LoadStats, convert, from_pretrained, save_pretrained
from dsv3lab.infer.blockfp8 import dequantize_blocks, quantize_blocks, scale_shape
from dsv3lab.infer.checkpoint import load_state_dict_folder, save_state_dict
from dsv3lab.infer.layout import from_rotate_half, layout, to_rotate_half
from helpers import checkpoint_tensors, random_tokens

transformers = pytest.importorskip("transformers")  # the `hf` extra, installed by `make setup`


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens)[0] if isinstance(model, dsv3lab.DeepSeekV3) else model(tokens).logits


# ---------------------------------------------------------------------- transformers both ways
def test_checkpoint_saved_by_transformers_loads_with_the_same_logits(tmp_path):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    )
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)  # non-zero: selection depends on it
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert any(
        "experts.0.gate_proj" in k
        for k in json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    )  # per-expert on disk
    with pytest.warns(UserWarning, match="no MTP weights"):  # transformers' config says 1 MTP layer, saves none
        ours = from_pretrained(tmp_path, dtype=torch.float32)
    assert ours.cfg.yarn_enabled and ours.cfg.n_expert_groups == 4 and ours.cfg.n_mtp == 0
    tokens = random_tokens(ours.cfg, batch=2, seqlen=40)
    assert (_logits(ours, tokens) - _logits(hf, tokens)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("rope_interleave", [True, False])
def test_dsv3lab_checkpoint_loads_in_transformers_with_the_same_logits(tiny_model, tmp_path, rope_interleave):
    from transformers import DeepseekV3ForCausalLM

    save_pretrained(tiny_model.eval(), tmp_path, rope_interleave=rope_interleave, max_shard_size="150KB")
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    assert cfg_json["rope_interleave"] is rope_interleave and cfg_json["num_nextn_predict_layers"] == 1
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = random_tokens(tiny_model.cfg, batch=2, seqlen=40)
    expected = _logits(tiny_model, tokens)
    assert (_logits(hf, tokens) - expected).abs().max().item() <= 1e-4
    # and back into dsv3lab: the rotate-half rows are permuted back exactly
    back = from_pretrained(tmp_path)
    assert torch.equal(_logits(back, tokens), expected)


def test_rope_permutation_is_a_bijection_on_the_rope_rows_only(tiny_cfg):
    w = torch.randn(tiny_cfg.n_heads * tiny_cfg.qk_head_dim, 32)
    rh = to_rotate_half(w, tiny_cfg, "q")
    torch.testing.assert_close(from_rotate_half(rh, tiny_cfg, "q"), w, rtol=0, atol=0)
    head = rh.view(tiny_cfg.n_heads, tiny_cfg.qk_head_dim, -1)
    orig = w.view_as(head)
    assert torch.equal(head[:, : tiny_cfg.qk_nope_head_dim], orig[:, : tiny_cfg.qk_nope_head_dim])
    r = tiny_cfg.qk_rope_head_dim  # rotate-half pairs (i, i + r/2) hold the interleaved pair (2i, 2i + 1)
    assert torch.equal(head[:, tiny_cfg.qk_nope_head_dim + 1], orig[:, tiny_cfg.qk_nope_head_dim + 2])
    assert torch.equal(head[:, tiny_cfg.qk_nope_head_dim + r // 2], orig[:, tiny_cfg.qk_nope_head_dim + 1])


# ---------------------------------------------------------------------- MTP and the layout
def test_mtp_weights_survive_the_round_trip(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path, max_shard_size="150KB")
    files = checkpoint_tensors(tmp_path)
    n = tiny_model.cfg.n_layers
    mtp = tiny_model.mtp[0]
    assert torch.equal(files[f"model.layers.{n}.eh_proj.weight"], mtp.eh_proj.weight)
    assert torch.equal(files[f"model.layers.{n}.mlp.experts.3.down_proj.weight"], mtp.block.ffn.experts.w2[3])
    assert torch.equal(files[f"model.layers.{n}.shared_head.norm.weight"], mtp.norm.weight)
    assert torch.equal(files[f"model.layers.{n}.embed_tokens.weight"], tiny_model.embed.weight)  # duplicates
    assert torch.equal(files[f"model.layers.{n}.shared_head.head.weight"], tiny_model.head.weight)
    assert set(files) == set(layout(tiny_model.cfg)) | {
        f"model.layers.{n}.embed_tokens.weight",
        f"model.layers.{n}.shared_head.head.weight",
    }
    back = from_pretrained(tmp_path)
    for (name, a), b in zip(tiny_model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    tokens = random_tokens(tiny_model.cfg, batch=1, seqlen=12)
    _, l1 = tiny_model.eval()(tokens, tokens)
    _, l2 = back(tokens, tokens)
    assert l1["mtp_1"].item() == l2["mtp_1"].item()
    assert from_pretrained(tmp_path, mtp=False).cfg.n_mtp == 0  # the main model alone, MTP tensors skipped


def test_loading_streams_through_meta_one_tensor_at_a_time(tiny_model, tmp_path, monkeypatch):
    save_pretrained(tiny_model, tmp_path, fp8=True, max_shard_size="60KB", rope_interleave=False)
    monkeypatch.setattr(dsv3lab.DeepSeekV3, "init_weights", lambda self: pytest.fail("loading must not initialise"))
    stats = LoadStats()
    model = from_pretrained(tmp_path, dtype=torch.float32, stats=stats)
    assert stats.files == sorted(stats.shard_bytes) and len(stats.files) > 5
    # what the loader held at once: one tensor (here the fp32 embedding; an E4M3 weight + scale + its dequantised and
    # permuted copies are smaller), never more than one shard, a fraction of the checkpoint
    largest = max(p.numel() * p.element_size() for p in model.state_dict().values())
    assert stats.peak_live_bytes <= largest <= max(stats.shard_bytes.values())
    assert stats.peak_live_bytes * 5 < sum(stats.shard_bytes.values())
    assert stats.live_bytes == 0
    monkeypatch.undo()
    fresh = dsv3lab.build_model(tiny_model.cfg)
    assert torch.equal(model.rope_cos, fresh.rope_cos) and all(
        int(m.tokens_per_expert.sum()) == 0 for m in model.moe_layers()
    )


# ---------------------------------------------------------------------- FP8
def _blockwise_reference(w, block):
    """A second implementation: loop over blocks."""
    rows, cols = scale_shape(w.shape, block)
    s = torch.empty(rows, cols)
    q = torch.empty_like(w, dtype=torch.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]].float()
            amax = tile.abs().max()
            s[i, j] = amax / 448 if amax > 0 else 1.0
            q[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (tile / s[i, j]).to(q.dtype)
    return q, s


@pytest.mark.parametrize("shape", [(130, 200), (256, 128), (7, 300)])
def test_block_quantizer_against_a_loop_and_transformers(shape):
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[1])  # columns of very different magnitude
    w[:5, :40] = 0  # an all-zero region
    q, s = quantize_blocks(w, (128, 128))
    q_ref, s_ref = _blockwise_reference(w, (128, 128))
    assert s.shape == scale_shape(w.shape) == (-(-shape[0] // 128), -(-shape[1] // 128))
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    deq = dequantize_blocks(q, s, dtype=torch.float32)
    scale = s.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]  # per element
    # E4M3 keeps 3 mantissa bits: rounding error <= 2^-4 relative, or 2^-10 (in scaled units) among subnormals
    assert ((deq - w).abs() <= w.abs() / 16 + scale * 2**-10).all()
    assert torch.equal(deq[:5, :40], torch.zeros(5, 40))
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    torch.testing.assert_close(deq, _dequantize_fp8_weight(q, s, [128, 128], torch.float32), rtol=0, atol=0)


def test_fp8_checkpoint_round_trip(tiny_model, tmp_path):
    save_pretrained(tiny_model.eval(), tmp_path, fp8=True)
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    assert cfg_json["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    files = checkpoint_tensors(tmp_path)
    w = files["model.layers.1.self_attn.q_b_proj.weight"]
    assert w.dtype == torch.float8_e4m3fn
    assert files["model.layers.1.self_attn.q_b_proj.weight_scale_inv"].shape == (1, 1)
    assert files["model.layers.1.mlp.experts.5.up_proj.weight"].dtype == torch.float8_e4m3fn
    for kept in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.2.eh_proj.weight",
        "model.norm.weight",
    ):
        assert files[kept].dtype == torch.float32 and kept + "_scale_inv" not in files
    assert files["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    back = from_pretrained(tmp_path, dtype=torch.float32)
    q, s = quantize_blocks(tiny_model.layers[1].ffn.experts.w3[5])
    assert torch.equal(back.layers[1].ffn.experts.w3[5], dequantize_blocks(q, s, dtype=torch.float32))
    tokens = random_tokens(tiny_model.cfg, batch=2, seqlen=16)
    ref = _logits(tiny_model, tokens)
    err = (_logits(back, tokens) - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.05  # E4M3 weights: close, not equal


def test_fp8_hook_sees_the_e4m3_weights(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path, fp8=True)
    seen = {}

    def hook(name, slot, q, scale, block, model):
        seen[name] = (q.dtype, tuple(scale.shape), block)
        return False  # not kept: the loader dequantises as usual

    from_pretrained(tmp_path, fp8_hook=hook)
    assert seen["model.layers.0.mlp.down_proj.weight"] == (torch.float8_e4m3fn, (1, 1), (128, 128))
    assert len(seen) == sum(s.fp8 for s in layout(tiny_model.cfg).values())


def test_convert_fp8_bf16_and_rope_layout_streaming(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path / "fp32", max_shard_size="150KB")
    save_pretrained(tiny_model, tmp_path / "fp8_direct", fp8=True, max_shard_size="150KB")
    convert(tmp_path / "fp32", tmp_path / "fp8", fp8=True)
    a, b = checkpoint_tensors(tmp_path / "fp8"), checkpoint_tensors(tmp_path / "fp8_direct")
    assert set(a) == set(b) and all(
        torch.equal(
            a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn else a[k],
            b[k].view(torch.uint8) if b[k].dtype == torch.float8_e4m3fn else b[k],
        )
        for k in a
    )
    convert(tmp_path / "fp8", tmp_path / "bf16", fp8=False, dtype=torch.bfloat16, rope_interleave=False)
    cfg_json = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in cfg_json and cfg_json["torch_dtype"] == "bfloat16"
    assert not cfg_json["rope_interleave"]
    from_fp8 = from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16)
    from_bf16 = from_pretrained(tmp_path / "bf16")
    assert from_bf16.embed.weight.dtype == torch.bfloat16
    for (name, x), y in zip(from_fp8.state_dict().items(), from_bf16.state_dict().values()):
        assert torch.equal(x, y), name


def test_plain_dsv3lab_folder_converts_to_the_official_layout(tiny_model, tmp_path):
    save_state_dict(tiny_model, tmp_path / "native")
    assert torch.equal(load_state_dict_folder(tmp_path / "native").head.weight, tiny_model.head.weight)
    convert(tmp_path / "native", tmp_path / "hf")
    back = from_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "native2", to="dsv3lab")
    assert load_file(tmp_path / "native2" / "model.safetensors").keys() == tiny_model.state_dict().keys()
    tokens = random_tokens(tiny_model.cfg, batch=1, seqlen=10)
    assert torch.equal(_logits(back, tokens), _logits(tiny_model.eval(), tokens))


# ---------------------------------------------------------------------- bad input
def _edit(folder, drop=(), add=None, replace=None):
    """Rewrite the shard holding each tensor (and the index) with tensors dropped, added or replaced."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    for file in files:
        sd = load_file(folder / file)
        for name in drop:
            sd.pop(name, None)
        for name, t in (replace or {}).items():
            if name in sd:
                sd[name] = t
        if file == files[0]:
            sd.update(add or {})
        save_file(sd, folder / file, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in drop}
    index["weight_map"].update({k: files[0] for k in (add or {})})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_and_unexpected_tensors_are_one_error(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path, max_shard_size="150KB")
    _edit(
        tmp_path,
        drop=["model.layers.1.mlp.experts.4.up_proj.weight", "model.norm.weight"],
        add={"model.layers.0.mlp.bias": torch.zeros(3)},
    )
    with pytest.raises(CheckpointError) as err:
        from_pretrained(tmp_path)
    msg = str(err.value)
    assert "2 missing: model.layers.1.mlp.experts.4.up_proj.weight, model.norm.weight" in msg
    assert "1 unexpected: model.layers.0.mlp.bias" in msg


def test_shape_mismatch_names_the_tensor_and_both_shapes(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path)
    _edit(tmp_path, replace={"model.layers.0.self_attn.kv_b_proj.weight": torch.zeros(100, 32)})
    with pytest.raises(
        CheckpointError,
        match=r"model.layers.0.self_attn.kv_b_proj.weight: the checkpoint holds "
        r"shape \(100, 32\) but the model of config.json needs \(128, 32\)",
    ):
        from_pretrained(tmp_path)


def test_fp8_weight_without_its_scale_is_an_error(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path, fp8=True)
    _edit(tmp_path, drop=["model.layers.0.self_attn.o_proj.weight_scale_inv"])
    with pytest.raises(CheckpointError, match="o_proj.weight is stored in torch.float8_e4m3fn but its scale"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "unsupported architecture"),
        ({"quantization_config": {"quant_method": "awq"}}, "quant_method='awq' is not supported"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ],
)
def test_unsupported_configs_are_errors(tiny_model, tmp_path, change, match):
    save_pretrained(tiny_model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        from_pretrained(tmp_path)


def test_saving_is_atomic(tiny_model, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    save_pretrained(tiny_model, target)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_pretrained(tiny_model, target)
    before = sorted(p.name for p in target.iterdir())
    import dsv3lab.infer.checkpoint as ckpt

    calls = {"n": 0}
    real = ckpt.save_file

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(tiny_model, target, max_shard_size="100KB", overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == before  # the old checkpoint is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind


def test_training_run_folder_converts_to_the_official_layout(tmp_path):
    from dsv3lab.train import TrainConfig, load_run, train
    from helpers import SyntheticData

    cfg = TrainConfig(
        preset="tiny",
        seq_len=16,
        steps=2,
        batch_size=2,
        micro_batch_size=2,
        eval_every=0,
        progress=False,
        out=str(tmp_path / "run"),
    )
    train(cfg, SyntheticData(vocab_size=512, seq_len=16))
    convert(tmp_path / "run", tmp_path / "hf", fp8=False)
    trained = load_run(tmp_path / "run").model
    back = from_pretrained(tmp_path / "hf")
    tokens = random_tokens(trained.cfg, batch=1, seqlen=12)
    assert torch.equal(_logits(back, tokens), _logits(trained, tokens))
    assert back.layers[1].ffn.gate.bias.abs().sum() > 0  # the bias the run learned survives
