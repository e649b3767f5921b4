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
import warnings
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

from .formats import FP8_DTYPES, fp8_format, resolve_dtype, round_to_grid

BLOCK = 128  # the paper's tile/block edge N_C
TILE = (1, BLOCK)  # activations and activation gradients: one token × 128 channels
BLOCK2D = (BLOCK, BLOCK)  # weights
AMAX_FLOOR = 1e-12  # amax of an all-zero tile is raised to this so that the scale is finite and positive
SCALE_FMTS = ("fp32", "ue8m0")  # the one vocabulary for scales: fp32 values, or UE8M0 powers of two


def resolve_scale_fmt(scale_fmt: str | None) -> str:
    """Check a scale format; ``None`` (the old spelling of ``"fp32"``) still works, with a DeprecationWarning."""
    if scale_fmt is None:
        warnings.warn('scale_fmt=None is deprecated: use scale_fmt="fp32"', DeprecationWarning, stacklevel=3)
        return "fp32"
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")
    return scale_fmt


@dataclass
class QuantizedTensor:
    """An FP8 tensor: its FP8 values, an fp32 ``scale`` per block of the last two dimensions, and the format.

    ``values`` holds the FP8 numbers themselves (every one exactly representable in ``fmt``) in an fp32 container,
    ``data`` the same numbers as a real float8 tensor (an exact cast). ``block`` is ``(rows, cols)`` of one scaling
    group on the last two dims, or ``None`` for one scale per tensor. ``x ≈ dequantize() = values · scale``.
    (The CPU emulation computes with ``values``: numerically identical to FP8 storage, without its memory saving.)
    """

    values: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int] | None
    fmt: str = "e4m3"

    @classmethod
    def from_fp8(cls, data: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> QuantizedTensor:
        """Wrap a float8 tensor (e.g. an official checkpoint's weight) and its scales."""
        fmt = {v: k for k, v in FP8_DTYPES.items()}.get(data.dtype)
        if fmt is None:
            raise ValueError(f"expected a float8 tensor, got {data.dtype}")
        return cls(data.float(), scale, block, fmt)

    @property
    def data(self) -> torch.Tensor:
        """The FP8 tensor (``float8_e4m3fn`` / ``float8_e5m2``); exact, since every value is on the grid."""
        return self.values.to(resolve_dtype(self.fmt))

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def expanded_scale(self) -> torch.Tensor:
        """The scale broadcast to the tensor's shape (fp32)."""
        return expand_scale(self.scale, self.block, self.values.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.block is None:
            return (self.values * self.scale).to(dtype)
        return blockwise(self.values, self.scale, self.block, torch.mul).to(dtype)


def expand_scale(scale: torch.Tensor, block: tuple[int, int] | None, shape: torch.Size) -> torch.Tensor:
    """Broadcast per-block scales [..., ceil(R/br), ceil(C/bc)] to a tensor of ``shape`` [..., R, C]."""
    if block is None:
        return scale.expand(shape)
    br, bc = block
    r, c = shape[-2:]
    return scale.repeat_interleave(br, dim=-2).repeat_interleave(bc, dim=-1)[..., :r, :c]


def scale_shape(shape: tuple[int, ...] | torch.Size, block: tuple[int, int] = BLOCK2D) -> tuple[int, int]:
    """[ceil(R / br), ceil(C / bc)]: the scales of a 2-D tensor of ``shape`` [R, C] in ``block``s (the official
    checkpoint's ``weight_scale_inv`` shape for 128×128 blocks)."""
    if len(shape) != 2:
        raise ValueError(f"block scales need a 2-D tensor [rows, cols], got shape {tuple(shape)}")
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def _effective_block(block: tuple[int, int], r: int, c: int) -> tuple[int, int]:
    # a block larger than the matrix is the whole matrix: same scales, and no padding needed
    return max(1, min(block[0], r)), max(1, min(block[1], c))


def blockwise(x: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], op) -> torch.Tensor:
    """``op(x, s)`` with each block's scale broadcast over its block, without materialising expanded scales:
    x [..., R, C] is viewed as [..., R/br, br, C/bc, bc] (zero-padded to whole blocks, cropped afterwards)."""
    *lead, r, c = x.shape
    nr, nc = scale.shape[-2:]
    br, bc = _effective_block(block, r, c)
    pr, pc = nr * br - r, nc * bc - c
    xp = F.pad(x, (0, pc, 0, pr)) if (pr or pc) else x
    out = op(xp.reshape(*lead, nr, br, nc, bc), scale[..., :, None, :, None]).reshape(*lead, nr * br, nc * bc)
    return out[..., :r, :c] if (pr or pc) else out


def check_finite(x: torch.Tensor, what: str = "input") -> None:
    """``ValueError`` if x holds NaN or ±inf (with how many and where the first one is)."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"FP8 quantization of {what} {tuple(x.shape)}: {int(bad.sum())} non-finite value(s) "
            f"(first at index {first}: {x[first].item()}); NaN/inf cannot be scaled into FP8. "
            "Fix the overflow upstream (learning rate, loss scale, init) instead of saturating it"
        )


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= s (s > 0), exactly: UE8M0 scale rounding (frexp, no log2 round-off)."""
    mantissa, exponent = torch.frexp(s)  # s = mantissa · 2^exponent with mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)  # s already a power of two
    return torch.ldexp(torch.ones_like(s), exponent)


def compute_scale(
    amax: torch.Tensor, fmt_max: float, scale_fmt: str = "fp32", amax_floor: float = AMAX_FLOOR
) -> torch.Tensor:
    """s = max(amax, floor) / fmt_max in fp32, rounded up to a power of two for ``ue8m0``."""
    scale_fmt = resolve_scale_fmt(scale_fmt)
    s = amax.float().clamp_min(amax_floor) / fmt_max
    return pow2_ceil(s) if scale_fmt == "ue8m0" else s


def _check_block(x: torch.Tensor, block) -> tuple[int, int] | None:
    if block is None:
        return None
    if len(block) != 2 or any(not isinstance(b, int) or b < 1 for b in block):
        raise ValueError(f"block must be (rows, cols) with positive integers or None (per tensor), got {block!r}")
    if x.dim() < 2:
        raise ValueError(
            f"block quantization works on the last two dimensions; got a {x.dim()}-D tensor "
            f"{tuple(x.shape)} (view it as [1, n] for 1×n tiles)"
        )
    return int(block[0]), int(block[1])


def block_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """max |x| per block of the last two dims (zero-padded to full blocks): [..., ceil(R/br), ceil(C/bc)].
    NaN and inf propagate (a non-finite value makes its block's amax non-finite)."""
    *lead, r, c = x.shape
    nr, nc = math.ceil(r / block[0]), math.ceil(c / block[1])
    br, bc = _effective_block(block, r, c)
    xp = F.pad(x, (0, nc * bc - c, 0, nr * br - r)) if (nr * br != r or nc * bc != c) else x
    # the ∞-norm is max |x| in one pass (no |x| temporary)
    return torch.linalg.vector_norm(xp.reshape(*lead, nr, br, nc, bc), ord=math.inf, dim=(-3, -1))


def quantize(
    x: torch.Tensor,
    block: tuple[int, int] | None = TILE,
    fmt: str | torch.dtype = "e4m3",
    scale_fmt: str = "fp32",
    amax_floor: float = AMAX_FLOOR,
) -> QuantizedTensor:
    """Quantize x to FP8 with one scale per ``block`` of its last two dims (``None``: one scale for the tensor).

    ``block=(1, 128)``: per token per 128 channels (activations, gradients); ``(128, 128)``: weights;
    ``(128, 1)``: per channel per 128 tokens (the Wgrad operands, see :mod:`dsv3lab.fp8.linear`).
    Values are divided by their scale and rounded to nearest-even onto the grid
    (:func:`~dsv3lab.fp8.formats.round_to_grid`: equal to torch's cast, much faster on a CPU). No clamp is
    needed: |x / s| is at most max·(1 + 2^-23) (the round-off of amax / max), which rounds to max. Raises
    ``ValueError`` for NaN/inf input (detected on the amax, which NaN and inf propagate to: no extra pass over x).
    """
    block = _check_block(x, block)
    fp = fp8_format(resolve_dtype(fmt))
    xf = x.float()
    if xf.numel() == 0:
        amax = xf.new_zeros(()) if block is None else block_amax(xf, block)
    else:
        amax = torch.linalg.vector_norm(xf, ord=math.inf) if block is None else block_amax(xf, block)
    if not bool(torch.isfinite(amax).all()):
        check_finite(x)  # raises, naming the first bad element
    scale = compute_scale(amax, fp.max, scale_fmt, amax_floor)
    y = xf / scale if block is None else blockwise(xf, scale, block, torch.div)
    return QuantizedTensor(round_to_grid(y, fp.dtype), scale, block, fp.name)  # = y.to(fp8), vectorised


def fake_quantize(
    x: torch.Tensor, block: tuple[int, int] | None = TILE, fmt: str | torch.dtype = "e4m3", scale_fmt: str = "fp32"
) -> torch.Tensor:
    """quantize → dequantize, returned in x's dtype: what an FP8 GEMM sees of x."""
    return quantize(x, block, fmt, scale_fmt).dequantize(x.dtype)


def tiles_on_grid(
    x: torch.Tensor, block: tuple[int, int] | None, fmt: str | torch.dtype = "e4m3", scale: torch.Tensor | None = None
) -> bool:
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
    scale = scale.float()
    q = xf / scale if block is None else blockwise(xf, scale, block, torch.div)
    q = q.to(fp.dtype).float()
    back = q * scale if block is None else blockwise(q, scale, block, torch.mul)
    # q is within an fp32 ulp of an FP8 value (possibly just above max: the cast then rounds, not saturates, onto it);
    # a value that is off the grid, or beyond max, does not survive the round trip
    return bool((back == xf).all())


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


def activations_with_outliers(
    tokens: int = 256, channels: int = 1024, n_outlier_channels: int = 4, magnitude: float = 100.0, seed: int = 0
) -> torch.Tensor:
    """Gaussian activations [tokens, channels] where a few channels are ``magnitude`` times larger (as LLM
    activations have "massive" channels). Seeded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g)
    cols = torch.randperm(channels, generator=g)[:n_outlier_channels]
    x[:, cols] *= magnitude
    return x


def granularity_error(
    x: torch.Tensor, granularity: str, fmt: str = "e4m3", scale_fmt: str = "fp32"
) -> dict[str, float]:
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


def outlier_scaling_demo(
    magnitudes: tuple[float, ...] = (1, 10, 100, 1e3, 1e4, 1e5),
    tokens: int = 256,
    channels: int = 1024,
    n_outlier_channels: int = 4,
    fmt: str = "e4m3",
    seed: int = 0,
) -> pd.DataFrame:
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
    """``q.values · q.scale`` (each scale broadcast over its block) in ``dtype``."""
    return q.dequantize(dtype)
