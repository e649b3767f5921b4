"""Checks that need a CUDA GPU (marker ``gpu``; deselected without one, run by benchmarks/gpu_check.sh): the same
code on CUDA equals the CPU reference."""

import pytest
import torch

import dsv3lab
from dsv3lab.fp8 import FP8Recipe, fp8_linear
from helpers import random_tokens

pytestmark = pytest.mark.gpu


def test_model_on_cuda_equals_cpu(tiny_model):
    tokens = random_tokens(tiny_model.cfg, batch=2, seqlen=32)
    with torch.no_grad():
        cpu, _ = tiny_model.eval()(tokens)
        gpu, _ = tiny_model.to("cuda")(tokens.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


def test_fp8_kernel_gemm_equals_emulation_on_cuda():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.fail("the FP8 kernel needs compute capability >= 8.9 (Ada/Hopper)")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 512, generator=g).cuda()
    w = (torch.randn(384, 512, generator=g) * 0.05).cuda()
    emulated = fp8_linear(x, w, FP8Recipe(gemm="emulate"))
    kernel = fp8_linear(x, w, FP8Recipe(gemm="kernel"))
    torch.testing.assert_close(kernel, emulated, rtol=1e-3, atol=1e-3)


def test_grouped_experts_in_bf16_equal_the_loop_on_cuda(tiny_cfg):
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.fail("F.grouped_mm in bf16 on CUDA needs compute capability >= 9.0")
    loop = dsv3lab.build_model(tiny_cfg, device="cuda", dtype=torch.bfloat16, seed=0).eval()
    grouped = dsv3lab.build_model(tiny_cfg.replace(moe_impl="grouped"), device="cuda", dtype=torch.bfloat16).eval()
    grouped.load_state_dict(loop.state_dict())
    tokens = random_tokens(tiny_cfg, batch=2, seqlen=32).cuda()
    with torch.no_grad():
        torch.testing.assert_close(grouped(tokens)[0], loop(tokens)[0], rtol=2e-2, atol=2e-2)
