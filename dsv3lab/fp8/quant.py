"""Fine-grained FP8 quantization: per tensor, per 1×128 tile, per 128×128 block (DeepSeek-V3 §3.3.2, Fig. 7a).

FP8 has a narrow dynamic range (E4M3: 2^-9 … 448), so a tensor is stored as FP8 values times an fp32 *scale*:
``x ≈ s · q`` with ``q = fp8(x / s)`` and ``s = amax / 448`` chosen so that the largest |x| of the group lands on the
largest E4M3 value. The question is how large "the group" is:

* **per tensor** — one scale. A single outlier (LLM activations have channels 100–1000× larger than the rest)
  sets s for everybody, and the ordinary values are pushed down into the subnormals or flushed to zero.
* **1×128 tiles** (activations and activation gradients) — one scale per token per 128 channels: an outlier
  channel only costs precision in the 128-wide tile that holds it.
* **128×128 blocks** (weights) — one scale per 128 output × 128 input channels. Blocks, not rows, so that the same
  quantized weight serves the forward GEMM (contracting over input channels) and the transposed backward GEMM
  (contracting over output channels): the scale is constant along both contraction directions within a block.

Scales always vary along the GEMM's *contraction* dimension K in steps of 128, which is what lets the GEMM apply
them once per 128-wide chunk of K when it promotes a partial sum to FP32 (see :mod:`dsv3lab.fp8.accum`).
Optionally scales are rounded *up* to a power of two (``scale_fmt="ue8m0"``, an 8-bit exponent with no mantissa, as
DeepSeek-V3.1 checkpoints and the paper's stored/communicated activations use): multiplying by them is exact.

Shapes that are not multiples of the block are zero-padded to full blocks before the amax is taken (zeros never
change an amax), then cropped again: ``data`` keeps the input's shape and ``scale`` has ``ceil(R/br) × ceil(C/bc)``
entries over the last two dimensions, as the official checkpoints' ``weight_scale_inv``.

Non-finite input is an error (``ValueError``), not a saturation: torch's cast silently turns ±inf into ±448 in
E4M3, which would hide an overflow upstream. An all-zero tile gets the scale ``AMAX_FLOOR / max`` and stays zero
(the official ``act_quant`` floors amax at 1e-4; dsv3lab uses 1e-12 so small gradients are not flushed).

Notebook: 07_fp8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

from .formats import fp8_format, resolve_dtype

BLOCK = 128  # the paper's tile/block edge N_C
TILE = (1, BLOCK)  # activations and activation gradients: one token × 128 channels
BLOCK2D = (BLOCK, BLOCK)  # weights
AMAX_FLOOR = 1e-12  # amax of an all-zero tile is raised to this so that the scale is finite and positive
SCALE_FMTS = (None, "ue8m0")


@dataclass
class QuantizedTensor:
    """FP8 ``data`` (the input's shape) and fp32 ``scale`` per block of the last two dimensions.

    ``block`` is ``(rows, cols)`` of one scaling group on the last two dims, or ``None`` for one scale per tensor.
    ``x ≈ dequantize() = data · scale`` (each scale broadcast over its block).
    """

    data: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int] | None

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def expanded_scale(self) -> torch.Tensor:
        """The scale broadcast to ``data``'s shape (fp32)."""
        return expand_scale(self.scale, self.block, self.data.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.data.float() * self.expanded_scale()).to(dtype)


def expand_scale(scale: torch.Tensor, block: tuple[int, int] | None, shape: torch.Size) -> torch.Tensor:
    """Broadcast per-block scales [..., ceil(R/br), ceil(C/bc)] to a tensor of ``shape`` [..., R, C]."""
    if block is None:
        return scale.expand(shape)
    br, bc = block
    r, c = shape[-2:]
    return scale.repeat_interleave(br, dim=-2).repeat_interleave(bc, dim=-1)[..., :r, :c]


def check_finite(x: torch.Tensor, what: str = "input") -> None:
    """``ValueError`` if x holds NaN or ±inf (with how many and where the first one is)."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"FP8 quantization of {what} {tuple(x.shape)}: {int(bad.sum())} non-finite value(s) "
                         f"(first at index {first}: {x[first].item()}); NaN/inf cannot be scaled into FP8. "
                         "Fix the overflow upstream (learning rate, loss scale, init) instead of saturating it")


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= s (s > 0), exactly: UE8M0 scale rounding (frexp, no log2 round-off)."""
    mantissa, exponent = torch.frexp(s)  # s = mantissa · 2^exponent with mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)  # s already a power of two
    return torch.ldexp(torch.ones_like(s), exponent)


def compute_scale(amax: torch.Tensor, fmt_max: float, scale_fmt: str | None = None,
                  amax_floor: float = AMAX_FLOOR) -> torch.Tensor:  # fmt: skip
    """s = max(amax, floor) / fmt_max in fp32, rounded up to a power of two for ``ue8m0``."""
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")
    s = amax.float().clamp_min(amax_floor) / fmt_max
    return pow2_ceil(s) if scale_fmt == "ue8m0" else s


def _check_block(x: torch.Tensor, block) -> tuple[int, int] | None:
    if block is None:
        return None
    if len(block) != 2 or any(not isinstance(b, int) or b < 1 for b in block):
        raise ValueError(f"block must be (rows, cols) with positive integers or None (per tensor), got {block!r}")
    if x.dim() < 2:
        raise ValueError(f"block quantization works on the last two dimensions; got a {x.dim()}-D tensor "
                         f"{tuple(x.shape)} (view it as [1, n] for 1×n tiles)")
    return int(block[0]), int(block[1])


def block_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """max |x| per block of the last two dims (zero-padded to full blocks): [..., ceil(R/br), ceil(C/bc)]."""
    br, bc = block
    *lead, r, c = x.shape
    nr, nc = math.ceil(r / br), math.ceil(c / bc)
    xp = F.pad(x, (0, nc * bc - c, 0, nr * br - r)) if (r % br or c % bc) else x
    return xp.abs().reshape(*lead, nr, br, nc, bc).amax(dim=(-3, -1))


def quantize(x: torch.Tensor, block: tuple[int, int] | None = TILE, fmt: str | torch.dtype = "e4m3",
             scale_fmt: str | None = None, amax_floor: float = AMAX_FLOOR) -> QuantizedTensor:  # fmt: skip
    """Quantize x to FP8 with one scale per ``block`` of its last two dims (``None``: one scale for the tensor).

    ``block=(1, 128)``: per token per 128 channels (activations, gradients); ``(128, 128)``: weights;
    ``(128, 1)``: per channel per 128 tokens (the Wgrad operands, see :mod:`dsv3lab.fp8.linear`).
    Values are divided by their scale, clamped to ±max (a no-op except for round-off at amax) and cast with
    round-to-nearest-even. Raises ``ValueError`` for NaN/inf input.
    """
    block = _check_block(x, block)
    fp = fp8_format(resolve_dtype(fmt))
    check_finite(x)
    xf = x.float()
    if block is None:
        scale = compute_scale(xf.abs().amax(), fp.max, scale_fmt, amax_floor)
        y = xf / scale
    else:
        scale = compute_scale(block_amax(xf, block), fp.max, scale_fmt, amax_floor)
        y = xf / expand_scale(scale, block, xf.shape)
    data = y.clamp(-fp.max, fp.max).to(fp.dtype)
    return QuantizedTensor(data, scale, block)


def fake_quantize(x: torch.Tensor, block: tuple[int, int] | None = TILE, fmt: str | torch.dtype = "e4m3",
                  scale_fmt: str | None = None) -> torch.Tensor:  # fmt: skip
    """quantize → dequantize, returned in x's dtype: what an FP8 GEMM sees of x."""
    return quantize(x, block, fmt, scale_fmt).dequantize(x.dtype)


def tiles_on_grid(x: torch.Tensor, block: tuple[int, int] | None, fmt: str | torch.dtype = "e4m3",
                  scale: torch.Tensor | None = None) -> bool:  # fmt: skip
    """Is every block of x exactly ``fl(s · q)`` with q FP8 values and one scale s per block?

    With ``scale`` given, s is that scale (x must equal ``dequantize`` of its own re-quantization, bit for bit).
    Without it, s is searched among powers of two: the smallest that makes the block fit under the format's max
    (if any power-of-two scale works, that one does, because the FP8 grid is closed under doubling below max).
    This checks an operand *after the fact*, without trusting the code that produced it.
    """
    fp = fp8_format(resolve_dtype(fmt))
    xf = x.float()
    if block is not None:
        block = _check_block(x, block)
    if scale is None:
        amax = xf.abs().amax() if block is None else block_amax(xf, block)
        scale = pow2_ceil(amax.clamp_min(torch.finfo(torch.float32).tiny) / fp.max)
    s = expand_scale(scale.float(), block, xf.shape)
    q = xf / s
    # q is within an fp32 ulp of an FP8 value (possibly just above max: the cast then rounds, not saturates, onto it);
    # a value that is off the grid, or beyond max, does not survive the round trip
    return bool(((q.to(fp.dtype).float() * s) == xf).all())


# ---------------------------------------------------------------------------------------------- error metrics
def quant_error(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    """Relative error ‖x − x̂‖/‖x‖, SNR in dB (10·log10 ‖x‖²/‖x − x̂‖²), max |x − x̂| and the share of non-zero
    values that became zero."""
    x, x_hat = x.double(), x_hat.double()
    err = (x - x_hat).norm()
    ref = x.norm()
    nz = x != 0
    return {
        "rel_error": float(err / ref) if ref > 0 else float(err),
        "snr_db": float(10 * torch.log10(ref**2 / err**2)) if err > 0 else math.inf,
        "max_abs": float((x - x_hat).abs().max()),
        "flushed_to_zero": float(((x_hat == 0) & nz).sum() / nz.sum().clamp_min(1)),
    }


GRANULARITIES: dict[str, object] = {
    "per tensor": None,
    "per token (1×K)": "row",
    "1×128 tile": TILE,
    "128×128 block": BLOCK2D,
}


def activations_with_outliers(tokens: int = 256, channels: int = 1024, n_outlier_channels: int = 4,
                              magnitude: float = 100.0, seed: int = 0) -> torch.Tensor:  # fmt: skip
    """Gaussian activations [tokens, channels] where a few channels are ``magnitude`` times larger (as LLM
    activations have "massive" channels). Seeded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g)
    cols = torch.randperm(channels, generator=g)[:n_outlier_channels]
    x[:, cols] *= magnitude
    return x


def granularity_error(x: torch.Tensor, granularity: str, fmt: str = "e4m3",
                      scale_fmt: str | None = None) -> dict[str, float]:  # fmt: skip
    """Quantization error of x [tokens, channels] at one of :data:`GRANULARITIES` (measured on the non-outlier
    majority too: ``rel_error_typical`` excludes the 1% largest-magnitude channels)."""
    block = GRANULARITIES[granularity]
    if block == "row":
        block = (1, x.shape[-1])
    x_hat = fake_quantize(x, block, fmt, scale_fmt)
    out = quant_error(x, x_hat)
    col_mag = x.abs().mean(0)
    typical = col_mag <= torch.quantile(col_mag, 0.99)
    out["rel_error_typical"] = quant_error(x[:, typical], x_hat[:, typical])["rel_error"]
    return out


def outlier_scaling_demo(magnitudes: tuple[float, ...] = (1, 10, 100, 1e3, 1e4, 1e5), tokens: int = 256,
                         channels: int = 1024, n_outlier_channels: int = 4, fmt: str = "e4m3",
                         seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """Why fine-grained scaling: quantization error per granularity as outlier channels grow.

    Returns one row per (magnitude, granularity) with :func:`quant_error` columns and ``rel_error_typical`` (the
    error on the ordinary channels, which per-tensor scaling sacrifices to the outliers).
    """
    rows = []
    for m in magnitudes:
        x = activations_with_outliers(tokens, channels, n_outlier_channels, m, seed)
        for name in GRANULARITIES:
            rows.append({"magnitude": float(m), "granularity": name, **granularity_error(x, name, fmt)})
    return pd.DataFrame(rows)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q.data · q.scale`` (each scale broadcast over its block) in ``dtype``."""
    return q.dequantize(dtype)
