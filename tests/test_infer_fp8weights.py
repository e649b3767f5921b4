"""FP8 checkpoints kept in FP8 (``from_pretrained(keep_fp8=True)``): the same model as dequantising on load, at a
quarter of the fp32 weight bytes; FP8 activations too with ``quantize_activations=True``; saved back bit for bit; bad
input."""

import json

import pytest
import torch

from dsv3lab.fp8.quant import quantize
from dsv3lab.infer import CheckpointError, from_pretrained, generate, save_pretrained
from dsv3lab.infer.fp8weights import FP8Experts, FP8WeightLinear
from dsv3lab.infer.layout import layout
from helpers import checkpoint_tensors, random_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens)[0]


@pytest.fixture
def fp8_ckpt(tiny_model, tmp_path):
    return save_pretrained(tiny_model, tmp_path / "fp8", fp8=True)


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_kept_fp8_equals_dequantised_on_load_and_holds_e4m3(fp8_ckpt, attn_impl):
    dense = from_pretrained(fp8_ckpt, dtype=torch.float32, attn_impl=attn_impl)
    kept = from_pretrained(fp8_ckpt, dtype=torch.float32, attn_impl=attn_impl, keep_fp8=True)
    n_fp8 = sum(s.fp8 for s in layout(kept.cfg).values())
    kept_linears = [m for m in kept.modules() if isinstance(m, FP8WeightLinear)]
    kept_experts = [m for m in kept.modules() if isinstance(m, FP8Experts)]
    experts_slots = 3 * kept.cfg.n_routed_experts * len(kept_experts)
    assert len(kept_linears) + experts_slots == n_fp8 and kept_experts
    # the stored bits are the checkpoint's, not re-quantised
    files = checkpoint_tensors(fp8_ckpt)
    wq = kept.layers[0].attn.wq_a if kept.cfg.q_lora_rank else kept.layers[0].attn.wq
    hf = "q_a_proj" if kept.cfg.q_lora_rank else "q_proj"
    name = f"model.layers.0.self_attn.{hf}.weight"
    assert torch.equal(wq.weight_fp8, files[name].view(torch.uint8))
    assert torch.equal(wq.weight_scale_inv.view(torch.float32), files[name + "_scale_inv"])
    # the same function: dequantising just before each GEMM = dequantising at load time
    tokens = random_tokens(kept.cfg, batch=2, seqlen=24)
    assert torch.equal(_logits(kept, tokens), _logits(dense, tokens))
    # a quarter of the bytes for the projections (fp32 model): 1 byte per weight plus one scale per block
    dense_bytes = sum(p.numel() * p.element_size() for n, p in dense.named_parameters() if "experts.w" in n)
    kept_bytes = sum(b.numel() * b.element_size() for n, b in kept.named_buffers() if "experts.w" in n)
    assert kept_bytes < 0.26 * dense_bytes
    assert not any(p.dtype == torch.float32 and "experts.w" in n for n, p in kept.named_parameters())


def test_kept_fp8_survives_to_dtype_and_generates_like_the_dequantised_model(fp8_ckpt):
    dense = from_pretrained(fp8_ckpt, dtype=torch.float32)
    kept = from_pretrained(fp8_ckpt, dtype=torch.float32, keep_fp8=True)
    cast = from_pretrained(fp8_ckpt, dtype=torch.float32, keep_fp8=True)
    cast.to(torch.bfloat16)  # must not round the E4M3 bits or the fp32 scales
    stored = [n for n, _ in kept.named_buffers() if n.endswith(("_fp8", "_scale_inv"))]
    assert stored and all(torch.equal(kept.get_buffer(n), cast.get_buffer(n)) for n in stored)
    prompts = random_tokens(kept.cfg, batch=2, seqlen=8).tolist()
    assert generate(kept, prompts, max_new_tokens=6).ids == generate(dense, prompts, max_new_tokens=6).ids


def test_quantize_activations_runs_the_fp8_gemm(fp8_ckpt):
    deq = from_pretrained(fp8_ckpt, dtype=torch.float32, keep_fp8=True)
    fp8 = from_pretrained(fp8_ckpt, dtype=torch.float32, keep_fp8=True, quantize_activations=True)
    lin = fp8.layers[0].attn.wkv_a
    x = torch.randn(5, lin.in_features)
    by_hand = quantize(x, (1, 128)).dequantize() @ lin.weight.t()  # 1×128 activation tiles · dequantised blocks
    torch.testing.assert_close(lin(x), by_hand, rtol=1e-5, atol=1e-6)
    tokens = random_tokens(deq.cfg, batch=2, seqlen=16)
    ref = _logits(deq, tokens)
    err = ((_logits(fp8, tokens) - ref).abs().max() / ref.abs().max()).item()
    assert 0 < err < 0.05  # E4M3 activations: close to, not equal to, the dequant path
    with pytest.warns(DeprecationWarning, match="quantize_activations=True"):  # the old spelling
        old = from_pretrained(fp8_ckpt, dtype=torch.float32, keep_fp8=True, fp8_gemm="fp8")
    torch.testing.assert_close(_logits(old, tokens), _logits(fp8, tokens), rtol=0, atol=0)


def test_kept_model_saves_the_stored_bits_back(fp8_ckpt, tmp_path):
    kept = from_pretrained(fp8_ckpt, keep_fp8=True)
    again = save_pretrained(kept, tmp_path / "again", fp8=True)
    a, b = checkpoint_tensors(fp8_ckpt), checkpoint_tensors(again)
    assert set(a) == set(b)
    for name in a:
        if a[name].dtype == torch.float8_e4m3fn or name.endswith("_scale_inv"):
            assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
    bf16 = save_pretrained(kept, tmp_path / "bf16")  # dequantised on the way out
    assert from_pretrained(bf16, dtype=torch.float32).layers[0].ffn.w1.weight.dtype == torch.float32


def test_keep_fp8_bad_input(tiny_model, tmp_path, fp8_ckpt):
    plain = save_pretrained(tiny_model, tmp_path / "plain")
    with pytest.raises(CheckpointError, match="keep_fp8=True needs an FP8 checkpoint"):
        from_pretrained(plain, keep_fp8=True)
    with pytest.raises(ValueError, match="fp8_gemm must be 'dequant' or 'fp8'"):
        from_pretrained(fp8_ckpt, keep_fp8=True, fp8_gemm="int4")
    with pytest.raises(ValueError, match="needs keep_fp8=True"):
        from_pretrained(fp8_ckpt, quantize_activations=True)
    with pytest.raises(ValueError, match="not both"):
        from_pretrained(fp8_ckpt, keep_fp8=True, fp8_hook=lambda *a: False)


def test_rotate_half_fp8_checkpoint_is_kept_when_the_rope_rows_stay_inside_their_blocks(tiny_model, tmp_path):
    rh = save_pretrained(tiny_model, tmp_path / "rh", fp8=True, rope_interleave=False)
    dense = from_pretrained(rh, dtype=torch.float32)
    kept = from_pretrained(rh, dtype=torch.float32, keep_fp8=True)
    tokens = random_tokens(kept.cfg, batch=2, seqlen=16)
    assert torch.equal(_logits(kept, tokens), _logits(dense, tokens))
    # kv_lora_rank 120: the 16 rotary rows of wkv_a (120..135) straddle the 128-row block boundary
    import dsv3lab

    wide = dsv3lab.build_model(tiny_model.cfg.replace(kv_lora_rank=120, qk_rope_head_dim=16), seed=0)
    crossing = save_pretrained(wide, tmp_path / "crossing", fp8=True, rope_interleave=False)
    with pytest.raises(CheckpointError, match="cross"):
        from_pretrained(crossing, keep_fp8=True)
    from_pretrained(crossing, keep_fp8=False)  # dequantised on load, it loads


def test_cli_generate_keeps_fp8(fp8_ckpt, tmp_path, capsys):
    from dsv3lab.cli import main

    args = ["generate", "--checkpoint", str(fp8_ckpt), "--ids", "1,2,3", "--max-new-tokens", "4", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--keep-fp8"]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == plain["ids"]
    assert main(args + ["--keep-fp8", "--quantize-activations"]) == 0
    with pytest.warns(DeprecationWarning, match="--quantize-activations"):  # the old spelling still runs
        assert main(args + ["--keep-fp8", "--fp8-gemm", "fp8"]) == 0
    assert main(args + ["--quantize-activations"]) == 2  # no effect without --keep-fp8: refused
    native = tmp_path / "native"
    from dsv3lab.infer import convert

    convert(fp8_ckpt, native, to="dsv3lab")
    assert main(["generate", "--checkpoint", str(native), "--ids", "1,2", "--keep-fp8"]) == 2
    assert "keep_fp8 needs an FP8 checkpoint in the official layout" in capsys.readouterr().err
