"""Block-wise FP8 (E4M3) weights as stored in the official checkpoint: one fp32 scale per 128×128 block.

The released DeepSeek-V3 weights keep every projection of the attention and FFN blocks as ``torch.float8_e4m3fn``
with a companion ``weight_scale_inv`` of shape [ceil(out/128), ceil(in/128)] (README_WEIGHTS.md). The stored
"inverse scale" is the factor that *dequantises*:

    W ≈ W_fp8 · weight_scale_inv[block],      weight_scale_inv = amax(|W_block|) / 448

This is exactly the 128×128 block format of FP8 training (``dsv3lab.fp8.quant``, ``BLOCK2D``), so this module is a
thin adapter over it for the checkpoint code: plain (E4M3 tensor, scale) pairs in, out. The one convention of the
checkpoint path: an all-zero block stores scale 1 (the training quantizer floors amax instead), so no file ever
holds a scale of ~0.

Paper: DeepSeek-V3 §3.3 (fine-grained quantization). Notebook: 10_inference.
"""

from __future__ import annotations

import torch

from ..fp8.formats import E4M3, E4M3_MAX
from ..fp8.quant import BLOCK2D, QuantizedTensor, block_amax, quantize, scale_shape

DEFAULT_BLOCK = BLOCK2D

__all__ = ["E4M3", "E4M3_MAX", "DEFAULT_BLOCK", "scale_shape", "quantize_blocks", "dequantize_blocks", "is_fp8"]


def quantize_blocks(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] (any float dtype) -> (W_fp8 [out, in] E4M3, weight_scale_inv [ceil(out/bm), ceil(in/bn)] fp32)."""
    if w.dim() != 2:
        raise ValueError(f"block FP8 needs a 2-D weight [out, in], got shape {tuple(w.shape)}")
    x = w.detach().float()
    q = quantize(x, tuple(block))
    scale = torch.where(block_amax(x, tuple(block)) > 0, q.scale, torch.ones_like(q.scale))  # all-zero block: 1
    return q.data.contiguous(), scale.contiguous()


def dequantize_blocks(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """W_fp8 [out, in] and weight_scale_inv [ceil(out/bm), ceil(in/bn)] -> W [out, in] in ``dtype``.

    A scale of the wrong shape is an error, not a broadcast.
    """
    if q.dim() != 2:
        raise ValueError(f"block FP8 needs a 2-D weight [out, in], got shape {tuple(q.shape)}")
    expected = scale_shape(q.shape, block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a weight of "
            f"shape {tuple(q.shape)} with {block[0]}x{block[1]} blocks"
        )
    return QuantizedTensor.from_fp8(q, scale_inv.float(), tuple(block)).dequantize(dtype)


def is_fp8(t: torch.Tensor) -> bool:
    """True for any 1-byte float8 dtype (the checkpoint uses E4M3; E5M2 would be dequantised the same way)."""
    return t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
