"""RMSNorm and the SwiGLU MLP against their formulas, computed by hand."""

import torch
import torch.nn.functional as F

from dsv3lab.model import MLP, RMSNorm


def test_rmsnorm_equals_its_formula_in_fp32_and_keeps_the_input_dtype():
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, generator=g) + 0.5)
    x = torch.randn(3, 5, 48, generator=g) * 7
    by_hand = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), by_hand, rtol=1e-6, atol=1e-6)
    xb = x.bfloat16()
    normed = (xb.float() / torch.sqrt((xb.float() ** 2).mean(-1, keepdim=True) + 1e-5)).bfloat16()  # fp32 inside
    assert torch.equal(norm(xb), norm.weight * normed)  # fp32 gain: the product promotes to fp32
    nb = RMSNorm(48, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        nb.weight.copy_(norm.weight)
    assert nb(xb).dtype == torch.bfloat16 and torch.equal(nb(xb), nb.weight * normed)  # a bf16 model stays bf16
    norm.init_weights()
    assert torch.equal(norm.weight, torch.ones(48)) and "48, eps=1e-05" in repr(norm)


def test_mlp_is_swiglu():
    g = torch.Generator().manual_seed(1)
    mlp = MLP(32, 80)
    mlp.init_weights(0.05)
    x = torch.randn(4, 7, 32, generator=g)
    w1, w2, w3 = mlp.w1.weight, mlp.w2.weight, mlp.w3.weight  # [80, 32], [32, 80], [80, 32]
    by_hand = (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
    torch.testing.assert_close(mlp(x), by_hand, rtol=1e-5, atol=1e-6)
    assert w1.shape == (80, 32) and w2.shape == (32, 80) and w3.shape == (80, 32)
    # the gate is w1 (silu) and the up projection w3: swapping them changes the output
    with torch.no_grad():
        mlp.w1.weight, mlp.w3.weight = mlp.w3.weight, mlp.w1.weight
    assert not torch.allclose(mlp(x), by_hand, atol=1e-4)
