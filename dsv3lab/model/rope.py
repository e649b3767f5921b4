"""Rotary position embedding with YaRN context extension (DeepSeek-V3 §2.1.1 decoupled RoPE, §4.3 YaRN).

DeepSeek applies RoPE only to the decoupled ``qk_rope_head_dim`` part of queries and keys, with the official
*interleaved* layout: dimensions (0, 1), (2, 3), … are rotated as pairs (a complex number each). Hugging Face's
``rotate_half`` layout pairs i with i + d/2 instead; the official weights are in the interleaved layout.

YaRN (when ``max_seq_len > original_seq_len``): frequencies whose wavelength is short compared with the original
context keep their value (extrapolation); long wavelengths are divided by the factor s (interpolation); a linear ramp
between the correction dimensions ``low`` and ``high`` (from ``beta_fast`` and ``beta_slow``) blends the two. The
attention softmax scale picks up mscale² with mscale = 0.1·ln(s) + 1 (see ``ModelConfig.softmax_scale``): the
paper's √t, which YaRN applies to queries and keys alike, so that the logits gain t = mscale².

Position interpolation (``rope_type="linear"``, Chen et al. 2023), the baseline YaRN improves on, divides *every*
frequency by s (positions m become m/s) and leaves the softmax scale alone. Both switch on by the same rule
(``ModelConfig.rope_scaled``: ``max_seq_len > original_seq_len`` and ``rope_factor > 1``).

Notebooks: 01_building_blocks, 12_long_context.
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig


def yarn_correction_dim(num_rotations: float, dim: int, base: float, original_seq_len: int) -> float:
    """The rotary dimension index whose wavelength fits ``num_rotations`` times into the original context."""
    return dim * math.log(original_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_correction_range(cfg: ModelConfig) -> tuple[int, int]:
    """(low, high) dimension indices of the YaRN ramp, clamped to [0, d_h^R - 1]. For the 671B config: (10, 23)."""
    dim = cfg.qk_rope_head_dim
    low = math.floor(yarn_correction_dim(cfg.beta_fast, dim, cfg.rope_theta, cfg.original_seq_len))
    high = math.ceil(yarn_correction_dim(cfg.beta_slow, dim, cfg.rope_theta, cfg.original_seq_len))
    return max(low, 0), min(high, dim - 1)


def linear_ramp(low: float, high: float, n: int) -> torch.Tensor:
    """0 below ``low``, 1 above ``high``, linear in between, for indices 0..n-1."""
    if low == high:
        high += 0.001  # avoid a division by zero, as the official code does
    return ((torch.arange(n, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """The d_h^R / 2 rotation frequencies θ_i = base^(-2i/d), rescaled when the context is extended: YaRN's ramp
    (``rope_type="yarn"``) or θ_i / s for every i (``"linear"``, position interpolation). Shape [d_h^R / 2], fp32."""
    dim = cfg.qk_rope_head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # [dim/2]
    if cfg.rope_scaled and cfg.rope_type == "linear":
        return freqs / cfg.rope_factor
    if cfg.yarn_enabled:
        low, high = yarn_correction_range(cfg)
        smooth = 1 - linear_ramp(low, high, dim // 2)  # 1 = keep (extrapolate), 0 = divide by s (interpolate)
        freqs = freqs / cfg.rope_factor * (1 - smooth) + freqs * smooth
    return freqs


def precompute_rope(cfg: ModelConfig, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position × frequency for positions 0..max_seq_len-1. Each [max_seq_len, d_h^R / 2], fp32."""
    freqs = rope_frequencies(cfg).to(device)
    t = torch.arange(cfg.max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(t, freqs)  # [max_seq_len, dim/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dimension (interleaved layout), in fp32.

    x: [b, s, h, d] (or [b, s, d]); cos, sin: [s, d/2]. Returns the same shape and dtype as x.
    """
    dtype = x.dtype
    xf = x.float().unflatten(-1, (-1, 2))  # [..., s, (h,) d/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    if x.dim() == 4:
        cos, sin = cos[:, None, :], sin[:, None, :]  # [s, 1, d/2] broadcast over heads
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # [..., d/2, 2]
    return out.flatten(-2).to(dtype)
