"""FP8 number formats: E4M3 and E5M2, read from torch's own float8 dtypes (DeepSeek-V3 §3.3).

An FP8 number is 1 sign bit, ``e`` exponent bits and ``m`` mantissa bits. With exponent bias B, a normal number is
``(-1)^s · 1.f · 2^(E - B)`` and a subnormal (E = 0) is ``(-1)^s · 0.f · 2^(1 - B)``. Two layouts exist:

* **E4M3** (``torch.float8_e4m3fn``, "fn" = finite, no infinities): 4 exponent bits, 3 mantissa bits, bias 7,
  largest value 448, smallest normal 2^-6, smallest subnormal 2^-9. Only the all-ones pattern is NaN, so the top
  binade keeps 7 of its 8 values. More precision, less range: DeepSeek-V3 uses it for **every** tensor (forward
  and backward), relying on fine-grained scaling for range.
* **E5M2** (``torch.float8_e5m2``): 5 exponent bits, 2 mantissa bits, bias 15, largest value 57344, with infinities
  and NaNs like IEEE half precision. The usual "hybrid" recipes use it for gradients; DeepSeek-V3 does not.

Between two powers of two 2^k ≤ |x| < 2^(k+1) a format with m mantissa bits has 2^m equally spaced values, so the
grid spacing is 2^(k - m) and the relative rounding error of round-to-nearest is at most 2^-(m+1): 6.25% for E4M3,
12.5% for E5M2 (in the normal range; subnormals lose relative precision).

Nothing here is typed in: :func:`fp8_format` derives every fact from ``torch.finfo`` and from the 256 bit patterns
of the dtype (``torch.arange(256, dtype=torch.uint8).view(dtype)``), and :func:`fp8_grid` lists every finite value.

Casting in torch 2.13 (checked by the tests): rounding is to nearest, ties to even; on CPU a finite value beyond
the largest E4M3 value *saturates* to ±448 and so does ±inf (silently), while E5M2 overflows to ±inf. dsv3lab's
quantizers therefore refuse non-finite input (see :mod:`dsv3lab.fp8.quant`).

Notebook: 07_fp8.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
E4M3 = torch.float8_e4m3fn  # DeepSeek-V3's one FP8 format (weights, activations, gradients)
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448: the largest finite E4M3 value, read from torch


@dataclass(frozen=True)
class FP8Format:
    """Facts about one FP8 format, all derived from the torch dtype."""

    name: str  # "e4m3" or "e5m2"
    dtype: torch.dtype
    exponent_bits: int
    mantissa_bits: int
    bias: int  # exponent bias B: the smallest normal is 2^(1 - B)
    max: float  # largest finite value
    min_normal: float  # smallest positive normal value
    min_subnormal: float  # smallest positive value (bit pattern 0x01)
    eps: float  # spacing just above 1.0 = 2^-mantissa_bits
    n_finite: int  # how many of the 256 bit patterns are finite numbers (±0 counted twice)
    has_inf: bool

    @property
    def max_rel_error(self) -> float:
        """Worst relative error of round-to-nearest in the normal range: half a spacing relative to 2^k."""
        return 2.0 ** -(self.mantissa_bits + 1)

    def spacing(self, x: torch.Tensor | float) -> torch.Tensor:
        """The grid spacing around |x|: 2^(floor(log2|x|) - m) in the normal range, 2^(1 - B - m) below it."""
        x = torch.as_tensor(x, dtype=torch.float64).abs()
        e = torch.floor(torch.log2(x.clamp_min(self.min_normal)))
        return torch.exp2(e - self.mantissa_bits)

    def summary(self) -> dict:
        return {
            "format": self.name,
            "dtype": str(self.dtype).replace("torch.", ""),
            "exponent_bits": self.exponent_bits,
            "mantissa_bits": self.mantissa_bits,
            "bias": self.bias,
            "max": self.max,
            "min_normal": self.min_normal,
            "min_subnormal": self.min_subnormal,
            "eps": self.eps,
            "max_rel_error": self.max_rel_error,
            "finite_values": self.n_finite,
            "has_inf": self.has_inf,
        }


def resolve_dtype(fmt: str | torch.dtype) -> torch.dtype:
    """``"e4m3"``/``"e5m2"`` or a float8 dtype -> the torch dtype (``ValueError`` for anything else)."""
    if isinstance(fmt, torch.dtype):
        if fmt not in FP8_DTYPES.values():
            raise ValueError(f"expected an FP8 dtype (float8_e4m3fn or float8_e5m2), got {fmt}")
        return fmt
    if fmt not in FP8_DTYPES:
        raise ValueError(f"unknown FP8 format {fmt!r}; allowed: {', '.join(FP8_DTYPES)}")
    return FP8_DTYPES[fmt]


def all_values(fmt: str | torch.dtype) -> torch.Tensor:
    """The 256 bit patterns 0x00..0xFF decoded as fp32 (NaN and ±inf included), in bit-pattern order."""
    return torch.arange(256, dtype=torch.uint8).view(resolve_dtype(fmt)).float()


def fp8_format(fmt: str | torch.dtype = "e4m3") -> FP8Format:
    """Derive the facts of an FP8 format from ``torch.finfo`` and its bit patterns (computed once per format)."""
    return _fp8_format(resolve_dtype(fmt))


@functools.cache
def _fp8_format(dtype: torch.dtype) -> FP8Format:
    info = torch.finfo(dtype)
    values = all_values(dtype)
    finite = values[torch.isfinite(values)]
    mantissa_bits = round(-math.log2(info.eps))  # eps = 2^-m
    exponent_bits = info.bits - 1 - mantissa_bits
    bias = 1 - round(math.log2(info.smallest_normal))  # smallest normal = 2^(1 - B)
    min_subnormal = float(values[1])  # bit pattern 0x01: the last mantissa bit with a zero exponent
    # cross-checks between the two sources (an inconsistent torch build would be a bug worth stopping for)
    assert min_subnormal == info.smallest_normal * info.eps, (min_subnormal, info.smallest_normal, info.eps)
    assert float(finite.max()) == info.max
    name = next(k for k, v in FP8_DTYPES.items() if v == dtype)
    return FP8Format(
        name=name,
        dtype=dtype,
        exponent_bits=exponent_bits,
        mantissa_bits=mantissa_bits,
        bias=bias,
        max=float(info.max),
        min_normal=float(info.smallest_normal),
        min_subnormal=min_subnormal,
        eps=float(info.eps),
        n_finite=int(finite.numel()),
        has_inf=bool(torch.isinf(values).any()),
    )


def fp8_grid(fmt: str | torch.dtype = "e4m3", positive: bool = False) -> torch.Tensor:
    """Every finite value of the format, sorted ascending (fp32), each once (−0 dropped); only > 0 if ``positive``."""
    values = all_values(fmt)
    values = torch.unique(values[torch.isfinite(values)])  # sorted, and -0.0 == 0.0 collapses
    return values[values > 0] if positive else values


def round_to_fp8(x: torch.Tensor, fmt: str | torch.dtype = "e4m3") -> torch.Tensor:
    """x rounded onto the format's grid (round to nearest, ties to even) and returned in x's dtype (no scaling)."""
    return x.to(resolve_dtype(fmt)).to(x.dtype)


def is_representable(x: torch.Tensor, fmt: str | torch.dtype = "e4m3") -> torch.Tensor:
    """Elementwise: is x exactly a finite value of the format? (A bool tensor.)"""
    fp = fp8_format(fmt)
    return torch.isfinite(x) & (x.abs() <= fp.max) & (round_to_fp8(x.float(), fp.dtype) == x.float())


# ---------------------------------------------------------------------------------------------- fast exact rounding
def round_to_grid(x: torch.Tensor, fmt: str | torch.dtype = "e4m3") -> torch.Tensor:
    """fp32 x rounded to nearest-even on the FP8 grid, still in fp32 (beyond ±max: saturates to ±max).

    Bit for bit equal to ``x.to(fp8).float()`` for every |x| <= max (the tests check grid values, midpoints,
    subnormals, signed zeros and random values), but vectorised:
    torch's CPU float8 casts convert one element at a time, which dominates an FP8 emulation on a CPU.

    It is the "magic number" trick the Triton kernels use too: for 2^e ≤ |x| < 2^(e+1), with e floored at the
    smallest normal exponent (subnormals share that binade's spacing), c = 1.5·2^(e − m + 23) has an fp32 ulp of
    exactly the FP8 spacing 2^(e − m), so ``(x + c) − c`` is x rounded to nearest-even on the FP8 grid (|x| ≪ c
    keeps the sum in c's binade; the subtraction is exact).
    """
    fp = fp8_format(fmt)
    x = x.float()
    biased = (x.view(torch.int32) >> 23) & 0xFF  # fp32 biased exponent: floor(log2 |x|) + 127
    biased = biased.clamp_min(127 + 1 - fp.bias)  # not below the smallest normal binade
    c = (((biased + 23 - fp.mantissa_bits) << 23) | 0x400000).view(torch.float32)  # 1.5 · 2^(e - m + 23)
    r = ((x + c) - c).clamp_(-fp.max, fp.max)
    return torch.copysign(r, x)  # (x + c) - c turns a negative value that rounds to zero into +0; the cast gives -0
