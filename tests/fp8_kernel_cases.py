"""Kernel cases, run by tests/test_fp8_kernels.py in a child process with ``TRITON_INTERPRET=1`` on a CPU (or
directly on a CUDA machine). Not collected on its own: pytest only collects ``test_*.py`` files.
"""

import os

import pytest
import torch

from dsv3lab.fp8.linear import FP8Recipe, fp8_linear
from dsv3lab.fp8.quant import BLOCK2D, TILE, quantize

CHILD = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if CHILD else "cuda"
kernel_test = pytest.mark.skipif(
    not (CHILD or torch.cuda.is_available()), reason="needs TRITON_INTERPRET=1 (set by the parent test) or a GPU"
)


def _kernels():
    from dsv3lab.fp8 import kernels

    if CHILD:
        assert kernels.interpreted(), "TRITON_INTERPRET=1 was set but the kernels are not interpreted"
    return kernels


# the values the interpreter's own float->e4m3 cast gets wrong (carry into the exponent, overflow, subnormals),
# every E4M3 grid value and every midpoint (ties to even)
def _boundary_tile_rows() -> torch.Tensor:
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = torch.unique(grid[torch.isfinite(grid)])
    mids = (grid[:-1] + grid[1:]) / 2
    special = torch.tensor([126.2, 127.9, 240.5, 15.9, 463.9, 464.0, 447.9, 1e-3, 9.7e-4, 2.0**-10, 3 * 2.0**-10])
    vals = torch.cat([grid, mids, mids * (1 + 2**-12), mids * (1 - 2**-12), special, -special])
    vals = torch.cat([vals, torch.zeros(-vals.numel() % 127)]).view(-1, 127)
    # each row is one 1×128 tile whose max is 448, so the scale is exactly 1 and the values are cast as they are
    return torch.cat([vals, torch.full((vals.shape[0], 1), 448.0)], dim=1)


@kernel_test
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_act_quant_equals_reference_bit_for_bit(scale_fmt):
    k = _kernels()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 384, generator=g) * torch.exp2(torch.randint(-10, 10, (6, 384), generator=g).float())
    x[1] = 0.0  # an all-zero row: finite scales, zero output
    for inp in (x, _boundary_tile_rows(), x.to(torch.bfloat16), x.view(2, 3, 384)):
        y, s = k.act_quant(inp.to(DEV), scale_fmt=scale_fmt)
        ref = quantize(inp, TILE, scale_fmt=scale_fmt)
        assert y.dtype == torch.float8_e4m3fn and s.shape == (*inp.shape[:-1], inp.shape[-1] // 128)
        assert torch.equal(s.cpu(), ref.scale)
        # bit for bit, except that the interpreter's own cast turns -0 into +0 (equal values)
        assert torch.equal(y.cpu().float(), ref.data.float())
        nonzero = ref.data.float() != 0
        assert torch.equal(y.cpu().view(torch.uint8)[nonzero], ref.data.view(torch.uint8)[nonzero])
    # the boundary rows really exercise the carries: 126.2 -> 128, 463.9 -> 448, 1e-3 -> 2^-9
    y, _ = k.act_quant(_boundary_tile_rows().to(DEV))
    assert {128.0, 448.0, 2.0**-9} <= set(y.cpu().float().flatten().tolist())


@kernel_test
def test_weight_dequant_equals_reference():
    k = _kernels()
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(1))
    q = quantize(w, BLOCK2D)
    for dtype in (torch.float32, torch.bfloat16):
        out = k.weight_dequant(q.data.to(DEV), q.scale.to(DEV), dtype)
        assert out.dtype == dtype and torch.equal(out.cpu(), q.dequantize().to(dtype))
    # BF16 ties round to even (the interpreter's own fp32 -> bf16 cast truncates): 1 · (1 + 2^-8) -> 1.0 and
    # 1 · (1 + 3·2^-8) -> 1 + 2^-6, where truncation would give 1 + 2^-7
    ones = torch.ones(128, 256).to(torch.float8_e4m3fn)
    s = torch.tensor([[1 + 2**-8, 1 + 3 * 2**-8]])
    out = k.weight_dequant(ones.to(DEV), s.to(DEV), torch.bfloat16).cpu().float()
    assert out[:, :128].eq(1.0).all() and out[:, 128:].eq(1 + 2**-6).all()


@kernel_test
@pytest.mark.parametrize("b_block", [BLOCK2D, TILE], ids=["128x128", "1x128"])
def test_fp8_gemm_equals_dequantized_reference(b_block):
    k = _kernels()
    g = torch.Generator().manual_seed(2)
    a = quantize(torch.randn(70, 384, generator=g), TILE)
    b = quantize(torch.randn(100, 384, generator=g) * torch.linspace(0.01, 10, 384), b_block)  # scales vary along K
    ref = a.dequantize() @ b.dequantize().t()
    out = k.fp8_gemm(a.data.to(DEV), a.scale.to(DEV), b.data.to(DEV), b.scale.to(DEV), out_dtype=torch.float32)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-4)
    bf = k.fp8_gemm(a.data.to(DEV), a.scale.to(DEV), b.data.to(DEV), b.scale.to(DEV))
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.cpu().float(), ref, rtol=1e-2, atol=1e-2)


@kernel_test
def test_fp8_grouped_gemm_equals_per_group_reference():
    k = _kernels()
    g = torch.Generator().manual_seed(3)
    offs = torch.tensor([40, 40, 75, 110], dtype=torch.int32)  # an empty group, groups not multiples of the tile
    a = quantize(torch.randn(110, 256, generator=g), TILE)
    w = quantize(torch.randn(4, 72, 256, generator=g), BLOCK2D)
    out = k.fp8_grouped_gemm(
        a.data.to(DEV), a.scale.to(DEV), w.data.to(DEV), w.scale.to(DEV), offs.to(DEV), out_dtype=torch.float32
    )
    a_hat, w_hat = a.dequantize(), w.dequantize()
    ref = torch.cat([a_hat[:40] @ w_hat[0].t(), a_hat[40:75] @ w_hat[2].t(), a_hat[75:] @ w_hat[3].t()])
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-4)


@kernel_test
def test_fp8_linear_kernel_backend_equals_emulation():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 50, 200, generator=g)  # K = 200: padded to 256 for the kernel
    w = torch.randn(130, 200, generator=g) * 0.05
    dy = torch.randn(2, 50, 130, generator=g)
    results = {}
    for gemm in ("emulate", "kernel"):
        xi, wi = x.clone().to(DEV).requires_grad_(), w.clone().to(DEV).requires_grad_()
        y = fp8_linear(xi, wi, FP8Recipe(gemm=gemm))
        y.backward(dy.to(DEV))
        results[gemm] = (y.detach().cpu(), xi.grad.cpu(), wi.grad.cpu())
    for ours, ref in zip(results["kernel"], results["emulate"]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@kernel_test
def test_bad_input_messages():
    k = _kernels()
    x = torch.randn(4, 200, device=DEV)
    with pytest.raises(ValueError, match="multiple of 128.*zero-pad K"):
        k.act_quant(x)
    with pytest.raises(ValueError, match="must be contiguous"):
        k.act_quant(torch.randn(256, 4, device=DEV).t())
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        k.act_quant(torch.ones(2, 128, dtype=torch.int32, device=DEV))
    a8 = torch.zeros(4, 256, device=DEV).to(torch.float8_e4m3fn)
    s = torch.ones(4, 2, device=DEV)
    with pytest.raises(ValueError, match="K = 200 is not a multiple of 128"):
        k.fp8_gemm(
            torch.zeros(4, 200, device=DEV).to(torch.float8_e4m3fn),
            torch.ones(4, 2, device=DEV),
            torch.zeros(4, 200, device=DEV).to(torch.float8_e4m3fn),
            torch.ones(1, 2, device=DEV),
        )
    with pytest.raises(ValueError, match="a must be a 2-D float8_e4m3fn"):
        k.fp8_gemm(torch.zeros(4, 256, device=DEV), s, a8, torch.ones(1, 2, device=DEV))
    with pytest.raises(ValueError, match=r"b's scales must have shape \(1, 2\).*or \(4, 2\)"):
        k.fp8_gemm(a8, s, a8, torch.ones(3, 2, device=DEV))
    with pytest.raises(ValueError, match="must share K"):
        k.fp8_gemm(a8, s, a8[:, :128], torch.ones(1, 1, device=DEV))
    with pytest.raises(ValueError, match="must be contiguous"):
        big = torch.zeros(256, 8, device=DEV).to(torch.float8_e4m3fn)
        k.fp8_gemm(a8, s, big.t()[:4], torch.ones(1, 2, device=DEV))
    with pytest.raises(ValueError, match=r"scales must be fp32 of shape \(1, 1\)"):
        k.weight_dequant(a8[:, :128], torch.ones(2, 2, device=DEV))
    with pytest.raises(ValueError, match="out_dtype must be torch.bfloat16 or torch.float32"):
        k.weight_dequant(a8[:, :128], torch.ones(1, 1, device=DEV), torch.float16)
    with pytest.raises(ValueError, match="non-decreasing group ends"):
        k.fp8_grouped_gemm(
            a8, s, a8.view(1, 4, 256), torch.ones(1, 1, 2, device=DEV), torch.tensor([3], dtype=torch.int32, device=DEV)
        )
