"""Block-wise FP8 (E4M3) weights as stored in the official checkpoint: one fp32 scale per 128×128 block.

The released DeepSeek-V3 weights keep every projection of the attention and FFN blocks as ``torch.float8_e4m3fn``
with a companion ``weight_scale_inv`` of shape [ceil(out/128), ceil(in/128)] (README_WEIGHTS.md). The stored
"inverse scale" is the factor that *dequantises*:

    W ≈ W_fp8 · weight_scale_inv[block],      weight_scale_inv = amax(|W_block|) / 448

where 448 is the largest finite E4M3 value. A block that overhangs the matrix edge is treated as zero-padded to 128,
so its amax is simply the amax of the elements that exist.

This module is the checkpoint path only: quantise when saving, dequantise when loading. It is deliberately small and
self-contained; ``dsv3lab.fp8`` (FP8 training and inference kernels) can take these tensors as they are when a model
keeps its weights in FP8 — see ``dsv3lab.infer.checkpoint.from_pretrained(keep_fp8=...)``.

Paper: DeepSeek-V3 §3.3 (fine-grained quantization). Notebook: 10_inference.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
DEFAULT_BLOCK = (128, 128)


def scale_shape(shape: tuple[int, ...] | torch.Size, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """[ceil(out / block_out), ceil(in / block_in)] for a 2-D weight of ``shape`` [out, in]."""
    if len(shape) != 2:
        raise ValueError(f"block FP8 needs a 2-D weight [out, in], got shape {tuple(shape)}")
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def _blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Zero-pad a [M, N] matrix to whole blocks and view it as [M/bm, bm, N/bn, bn]."""
    m, n = x.shape
    bm, bn = block
    mb, nb = scale_shape(x.shape, block)
    padded = torch.nn.functional.pad(x, (0, nb * bn - n, 0, mb * bm - m))
    return padded.view(mb, bm, nb, bn)


def quantize_blocks(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] (any float dtype) -> (W_fp8 [out, in] E4M3, weight_scale_inv [ceil(out/bm), ceil(in/bn)] fp32).

    An all-zero block gets scale 1 (and zeros), so no NaN can appear.
    """
    x = w.detach().float()
    blocks = _blocks(x, block)  # [mb, bm, nb, bn]
    amax = blocks.abs().amax(dim=(1, 3))  # [mb, nb]
    scale_inv = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX)
    m, n = x.shape
    q = q.flatten(0, 1).flatten(1, 2)[:m, :n]  # back to [out, in], padding dropped
    return q.to(E4M3).contiguous(), scale_inv.contiguous()


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
    m, n = q.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:m].repeat_interleave(block[1], 1)[:, :n]  # [out, in]
    return (q.float() * scale).to(dtype)


def is_fp8(t: torch.Tensor) -> bool:
    """True for any 1-byte float8 dtype (the checkpoint uses E4M3; E5M2 would be dequantised the same way)."""
    return t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
