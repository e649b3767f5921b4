"""The FP8 training recipe: every GEMM sees FP8 operands (checked by instrumenting the matmuls), gradients stay
within the stated bound of the high-precision ones, the model integration keeps checkpoints and paths intact."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import dsv3lab
from dsv3lab.fp8 import AdamW, FP8Linear, FP8Recipe, fp8_grouped_linear, fp8_linear
from dsv3lab.fp8.quant import BLOCK2D, TILE, fake_quantize, tiles_on_grid
from dsv3lab.fp8.record import GemmRecorder
from helpers import random_tokens


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------------------------------------- the three GEMMs
def test_fprop_dgrad_wgrad_each_multiply_fp8_operands():
    m, k, n = 160, 256, 384  # distinct, so every GEMM is recognised by its operand shapes; M is not a multiple of 128
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, m // 2, k, generator=g, requires_grad=True)
    lin = FP8Linear(k, n, recipe=FP8Recipe(scale_fmt="ue8m0", gemm="emulate"))
    with torch.no_grad():
        lin.weight.normal_(0, 0.05, generator=g)
    dy = torch.randn(2, m // 2, n, generator=g)
    with GemmRecorder() as rec:
        lin(x).backward(dy)
    by_shape = {tuple(ops[0].shape): (name, ops) for name, ops in rec.calls}
    assert [name for name, _ in rec.calls] == ["mm"] * 3, [name for name, _ in rec.calls]
    # mm(A [m, k], B [k, n]): A tiled along its rows' K, B along its columns' K (the contraction dimension)
    expected = {
        (m, k): ("Fprop  x·Wᵀ", TILE, BLOCK2D, x.detach().reshape(m, k), lin.weight.detach().t()),
        (m, n): ("Dgrad  dy·W", TILE, BLOCK2D, dy.reshape(m, n), lin.weight.detach()),
        (n, m): ("Wgrad  dyᵀ·x", TILE, (128, 1), dy.reshape(m, n).t(), x.detach().reshape(m, k)),
    }
    assert set(by_shape) == set(expected)
    for shape, (label, a_tiles, b_tiles, a_raw, b_raw) in expected.items():
        _, (a, b) = by_shape[shape]
        # exactly scale × E4M3 on the paper's tiling, with power-of-two scales found from the operand alone ...
        assert tiles_on_grid(a, a_tiles), label
        assert tiles_on_grid(b, b_tiles), label
        # ... and really quantized: not the high-precision values, but within E4M3 rounding of them
        assert not torch.equal(a, a_raw) and not torch.equal(b, b_raw), label
        assert _rel(a, a_raw) < 0.05 and _rel(b, b_raw) < 0.05, label
    # Wgrad's x is the *stored* FP8 copy re-tiled (dequantize -> transpose -> quantize), so it is on both grids
    _, (_, x_wgrad) = by_shape[(n, m)]
    assert tiles_on_grid(x_wgrad, (128, 1))


def test_operands_equal_the_reference_quantization_with_fp32_scales():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 256, generator=g, requires_grad=True)
    w = (torch.randn(300, 256, generator=g) * 0.05).requires_grad_()
    dy = torch.randn(200, 300, generator=g)
    with GemmRecorder() as rec:
        fp8_linear(x, w, FP8Recipe(gemm="emulate")).backward(dy)
    ops = {tuple(o[0].shape): o for _, o in rec.calls}
    xd, wd = x.detach(), w.detach()
    x_hat = fake_quantize(xd, TILE)
    torch.testing.assert_close(ops[(200, 256)][0], x_hat, rtol=0, atol=0)
    torch.testing.assert_close(ops[(200, 256)][1], fake_quantize(wd, BLOCK2D).t(), rtol=0, atol=0)
    torch.testing.assert_close(ops[(200, 300)][0], fake_quantize(dy, TILE), rtol=0, atol=0)
    torch.testing.assert_close(ops[(300, 200)][0], fake_quantize(dy.t(), TILE), rtol=0, atol=0)
    torch.testing.assert_close(ops[(300, 200)][1], fake_quantize(x_hat.t(), TILE).t(), rtol=0, atol=0)


@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_outputs_and_gradients_are_close_to_high_precision(scale_fmt):
    """Bound: each of y, dx, dW is within 5% (relative Frobenius norm) of the FP32 result, and not closer than 1%.

    Why 5%: E4M3 round-to-nearest has an RMS relative error of about 2.6% on Gaussian data; a GEMM with two
    independently quantized operands gives ≈ √2 · 2.6% ≈ 3.7%, and Wgrad re-quantizes the stored FP8 activation
    once more (≈ 4.5%).
    """
    g = torch.Generator().manual_seed(2)
    m, k, n = 256, 512, 384
    x = torch.randn(m, k, generator=g, requires_grad=True)
    w = (torch.randn(n, k, generator=g) * 0.05).requires_grad_()
    dy = torch.randn(m, n, generator=g)
    y = fp8_linear(x, w, FP8Recipe(scale_fmt=scale_fmt, gemm="emulate"))
    y.backward(dy)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = x2 @ w2.t()
    y2.backward(dy)
    for name, ours, ref in (("y", y, y2), ("dx", x.grad, x2.grad), ("dW", w.grad, w2.grad)):
        assert 0.01 < _rel(ours, ref) < 0.05, (name, _rel(ours, ref))
        cos = torch.nn.functional.cosine_similarity(ours.flatten().float(), ref.flatten().float(), dim=0)
        assert cos > 0.998, (name, cos)


def test_dtypes_fp32_bf16_and_autocast():
    lin = FP8Linear(256, 128)
    x = torch.randn(4, 256, requires_grad=True)
    y = lin(x)
    y.sum().backward()
    assert y.dtype == torch.float32 and x.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32
    xb = torch.randn(4, 256, dtype=torch.bfloat16, requires_grad=True)
    lin.weight.grad = None
    yb = lin(xb)
    yb.float().sum().backward()
    assert yb.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16
    assert lin.weight.grad.dtype == torch.float32  # FP32 master weight and gradient
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = lin(x)
        assert ya.dtype == torch.bfloat16  # like nn.Linear under autocast
    # autocast does not round the FP8 operands to bf16: same result as without autocast, up to the output cast
    torch.testing.assert_close(ya.float(), y.detach().to(torch.bfloat16).float(), rtol=0, atol=0)


def test_fp8_linear_is_a_drop_in_linear():
    lin = FP8Linear(64, 32)
    assert isinstance(lin, nn.Linear) and lin.bias is None
    assert list(lin.state_dict()) == ["weight"]
    with torch.device("meta"):
        assert FP8Linear(7168, 1536).weight.shape == (1536, 7168)
    with pytest.raises(ValueError, match="no bias"):
        FP8Linear(4, 4, bias=True)
    with pytest.raises(ValueError, match="input features"):
        fp8_linear(torch.ones(2, 5), torch.ones(3, 4))


def test_grouped_fp8_equals_per_expert_fp8_linear():
    g = torch.Generator().manual_seed(3)
    offs = torch.tensor([70, 70, 200, 330], dtype=torch.int32)  # an empty group; groups not multiples of 128
    xs = torch.randn(330, 192, generator=g, requires_grad=True)
    w = (torch.randn(4, 160, 192, generator=g) * 0.05).requires_grad_()
    dy = torch.randn(330, 160, generator=g)
    recipe = FP8Recipe(gemm="emulate")
    fp8_grouped_linear(xs, w, offs, recipe).backward(dy)
    xs2, w2 = xs.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ys, start = [], 0
    for e, end in enumerate(offs.tolist()):
        ys.append(fp8_linear(xs2[start:end], w2[e], recipe) if end > start else xs2.new_zeros(0, 160))
        start = end
    torch.cat(ys).backward(dy)
    torch.testing.assert_close(xs.grad, xs2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)
    assert w.grad[1].abs().sum() == 0  # the empty expert gets no gradient


# ---------------------------------------------------------------------------------------------- the model
FP8_PROJECTIONS = ("wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "w1", "w2", "w3", "eh_proj")


def test_config_routes_exactly_the_papers_fp8_projections(tiny_cfg):
    model = dsv3lab.build_model(tiny_cfg.replace(fp8=True), seed=0)
    fp8 = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert fp8 == {n for n in linear if n.split(".")[-1] in FP8_PROJECTIONS}
    assert "head" in linear - fp8
    assert "layers.0.ffn.w1" in fp8 and "layers.1.ffn.shared_experts.w2" in fp8 and "mtp.0.eh_proj" in fp8
    assert all(moe.experts.fp8 is not None for moe in model.moe_layers())
    assert not isinstance(model.embed, FP8Linear) and all(not isinstance(m.gate, nn.Linear) for m in model.moe_layers())
    plain = dsv3lab.build_model(tiny_cfg.replace(fp8=True, q_lora_rank=0), seed=0)
    assert isinstance(plain.layers[0].attn.wq, FP8Linear)
    assert not any(isinstance(m, FP8Linear) for m in dsv3lab.build_model(tiny_cfg).modules())


def test_state_dict_is_unchanged_by_fp8(tiny_model):
    fp8 = dsv3lab.build_model(tiny_model.cfg.replace(fp8=True))
    ref = tiny_model.state_dict()
    assert {k: v.shape for k, v in fp8.state_dict().items()} == {k: v.shape for k, v in ref.items()}
    fp8.load_state_dict(ref)  # strict, both ways
    tiny_model.load_state_dict(fp8.state_dict())
    assert "layers.0.attn.wq_a.weight" in ref


@pytest.mark.parametrize("moe_impl", ["loop", "grouped"])
def test_fp8_model_trains_close_to_fp32(tiny_model, moe_impl):
    tokens = random_tokens(tiny_model.cfg, batch=2, seqlen=32)
    fp8 = dsv3lab.build_model(tiny_model.cfg.replace(fp8=True, moe_impl=moe_impl))
    fp8.load_state_dict(tiny_model.state_dict())
    _, ref = tiny_model(tokens, tokens.roll(-1, 1))
    _, ours = fp8(tokens, tokens.roll(-1, 1))
    assert ours["main"].item() == pytest.approx(ref["main"].item(), rel=2e-3)
    assert ours["main"].item() != ref["main"].item()
    ours["total"].backward()
    missing = [n for n, p in fp8.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_fp8_loop_equals_grouped(tiny_model):
    tokens = random_tokens(tiny_model.cfg, batch=2, seqlen=40)
    out = {}
    for impl in ("loop", "grouped"):
        model = dsv3lab.build_model(tiny_model.cfg.replace(fp8=True, moe_impl=impl))
        model.load_state_dict(tiny_model.state_dict())
        _, losses = model(tokens, tokens.roll(-1, 1))
        losses["total"].backward()
        out[impl] = (losses["total"].detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(out["loop"][0], out["grouped"][0], rtol=1e-5, atol=1e-6)
    for name, grad in out["loop"][1].items():
        torch.testing.assert_close(grad, out["grouped"][1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_fp8_naive_and_absorb_agree_within_fp8_error(tiny_model):
    # absorb reads the high-precision wkv_b master weight (MLA.wkv_b_weight), naive runs wkv_b as an FP8 GEMM
    tokens = random_tokens(tiny_model.cfg)
    logits = {}
    for impl in ("naive", "absorb"):
        model = dsv3lab.build_model(tiny_model.cfg.replace(fp8=True, attn_impl=impl))
        model.load_state_dict(tiny_model.state_dict())
        assert model.layers[0].attn.wkv_b_weight().dtype == torch.float32
        with torch.no_grad():
            logits[impl] = model(tokens)[0]
    ref = tiny_model(tokens)[0].detach()
    assert 0 < _rel(logits["naive"], ref) < 0.02 and 0 < _rel(logits["absorb"], ref) < 0.02
    assert _rel(logits["absorb"], logits["naive"]) < 2 * _rel(logits["naive"], ref)


def test_fp8_config_fields_and_messages(tiny_cfg):
    assert tiny_cfg.with_overrides(["fp8=true"]).fp8 is True  # what `--set fp8=true` does
    assert tiny_cfg.with_overrides(["fp8_scale_fmt=ue8m0"]).fp8_scale_fmt == "ue8m0"
    with pytest.raises(ValueError, match="fp8 must be a bool"):
        tiny_cfg.replace(fp8="yes")
    with pytest.raises(ValueError, match=r"fp8_gemm must be one of \('auto', 'emulate', 'kernel'\)"):
        tiny_cfg.replace(fp8_gemm="triton")
    with pytest.raises(ValueError, match="fp8_scale_fmt must be one of"):
        tiny_cfg.replace(fp8_scale_fmt="e8m0")
    model = dsv3lab.build_model(tiny_cfg.replace(fp8=True, fp8_gemm="kernel"), seed=0)
    with pytest.raises(ValueError, match="fp8_gemm='kernel'.*CUDA GPU.*compute capability >= 8.9.*on cpu"):
        model(random_tokens(tiny_cfg))


def test_triton_is_imported_only_when_a_kernel_runs():
    """dsv3lab.fp8 is plain torch and imported with the model (imports at module top); its Triton kernels are the
    one optional heavy dependency, imported only when a kernel GEMM runs — never by an FP8 model on a CPU. (torch's
    own compiler stack may import triton during a forward; that is torch's choice, not dsv3lab's.)"""
    code = (
        "import sys, torch, dsv3lab\n"
        "assert 'triton' not in sys.modules, 'import dsv3lab imported triton'\n"
        "m = dsv3lab.build_model(dsv3lab.ModelConfig.preset('tiny', fp8=True))\n"
        "m(torch.randint(0, 512, (1, 16)))\n"
        "assert 'dsv3lab.fp8.kernels' not in sys.modules, 'the Triton kernels were imported on CPU'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- optimizer
def test_adamw_matches_torch_with_fp32_moments_and_stores_bf16_moments():
    g = torch.Generator().manual_seed(4)
    p0 = torch.randn(40, 30, generator=g)
    params = [nn.Parameter(p0.clone()) for _ in range(3)]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opts = [
        torch.optim.AdamW([params[0]], foreach=False, **kw),
        AdamW([params[1]], moment_dtype=torch.float32, **kw),
        AdamW([params[2]], **kw),
    ]
    for _ in range(25):
        grad = torch.randn(40, 30, generator=g)
        for p, opt in zip(params, opts):
            p.grad = grad.clone()
            opt.step()
    torch.testing.assert_close(params[1], params[0], rtol=0, atol=0)
    state = opts[2].state[params[2]]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.bfloat16
    assert params[2].dtype == torch.float32
    drift = (params[2] - params[0]).abs().max().item()
    assert 0 < drift < 0.01 * 25 * 1e-2  # BF16 moments move each step by well under 1% of the step size
    with pytest.raises(ValueError, match="moment_dtype"):
        AdamW([nn.Parameter(torch.ones(1))], moment_dtype=torch.int8)


def test_loss_curve_comparison_by_hand():
    import pandas as pd

    from dsv3lab.fp8.compare import ema, loss_curves

    assert ema([4.0, 2.0, 2.0], alpha=0.5).tolist() == [4.0, 3.0, 2.5]
    a = pd.DataFrame({"step": [0, 1, 2], "loss_main": [4.0, 2.0, 2.0]})
    b = pd.DataFrame({"step": [0, 1, 2], "loss_main": [4.0, 2.2, 2.0]})
    curves = loss_curves(a, b, seed=3, alpha=0.5)
    # smoothed: bf16 4, 3, 2.5; fp8 4, 3.1, 2.55 -> rel diff 0, 0.1/3, 0.05/2.5
    assert curves.rel_diff.tolist() == pytest.approx([0.0, 0.1 / 3, 0.02])
    assert (curves.seed == 3).all()
    with pytest.raises(ValueError, match="same steps"):
        loss_curves(a, b.iloc[:2])
