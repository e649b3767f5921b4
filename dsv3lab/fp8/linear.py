"""The FP8 training recipe for Linear layers and grouped experts (DeepSeek-V3 §3.3, Fig. 6).

A Linear layer y = x·Wᵀ costs three GEMMs per training step, and DeepSeek-V3 runs **all three in FP8** (E4M3),
each with its operands quantized along the GEMM's contraction dimension in groups of 128:

=========  ==============  ======================================================  ===================================
GEMM       computes        operand A (tiles)                                       operand B (tiles)
=========  ==============  ======================================================  ===================================
Fprop      y  = x · Wᵀ     x: 1×128, per token per 128 input channels              W: 128×128 blocks
Dgrad      dx = dy · W     dy: 1×128, per token per 128 output channels            W: the same 128×128 blocks
Wgrad      dW = dyᵀ · x    dy: 128×1, per output channel per 128 tokens            x: 128×1, per input channel per
                                                                                    128 tokens
=========  ==============  ======================================================  ===================================

Weights use square blocks so that one quantized copy serves both the forward GEMM (contracting over input channels)
and the transposed Dgrad GEMM (contracting over output channels). Wgrad contracts over *tokens*, so both of its
operands are tiled along tokens: the paper (§3.5.2) describes exactly this for the activations — stored in FP8 as
1×128 tiles after the forward pass, then in the backward pass "read out, dequantized, transposed, re-quantized into
128×1 tiles" — and dsv3lab does the same (x is saved as FP8 1×128, re-tiled to 128×1 for Wgrad; dy is quantized
twice from its high-precision value, 1×128 for Dgrad and 128×1 for Wgrad). Every GEMM accumulates in FP32 with
the scales applied per 128-wide chunk of K; outputs are FP32 or BF16 (the input's dtype, or the autocast dtype),
weight gradients FP32. Master weights stay FP32 Parameters: the FP8 copy of W is made on the fly each step.

Not modelled (documented simplifications): the E5M6 format the paper uses for the cached input of the Linear after
attention, and FP8 dispatch/communication. Everything else in the model — embedding, output head, router, norms,
the attention core (softmax(QKᵀ)V), SwiGLU — stays in high precision, as in the paper.

Two GEMM backends compute the same thing (``FP8Recipe.gemm``):

* ``"emulate"`` (CPU and any GPU): quantize → dequantize the operands (exact: scale × FP8 value) and multiply in
  FP32 with autocast off. Faithful to the operands; the accumulation is exact FP32, i.e. what the FP32 promotion
  of :mod:`dsv3lab.fp8.accum` buys back.
* ``"kernel"``: the block-scaled Triton GEMM of :mod:`dsv3lab.fp8.kernels` on real FP8 tensor cores (CUDA, compute
  capability ≥ 8.9), or under ``TRITON_INTERPRET=1`` on a CPU for tests. ``"auto"`` picks it on such a GPU and
  emulates otherwise.

Notebook: 07_fp8.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .formats import fp8_format, resolve_dtype, round_to_grid
from .quant import BLOCK, BLOCK2D, TILE, QuantizedTensor, check_finite, compute_scale, quantize, resolve_scale_fmt

GEMMS = ("auto", "emulate", "kernel")


@dataclass(frozen=True)
class FP8Recipe:
    """How the FP8 GEMMs are done: the element format, the scale format and the backend."""

    fmt: str = "e4m3"  # every tensor in E4M3, as DeepSeek-V3
    scale_fmt: str = "fp32"  # "fp32" scales or "ue8m0" (powers of two)
    gemm: str = "auto"  # the backend: "emulate", "kernel" (Triton) or "auto" (ModelConfig.fp8_gemm)

    def __post_init__(self) -> None:
        resolve_dtype(self.fmt)
        object.__setattr__(self, "scale_fmt", resolve_scale_fmt(self.scale_fmt))
        if self.gemm not in GEMMS:
            raise ValueError(f"gemm must be one of {GEMMS}, got {self.gemm!r}")

    @classmethod
    def from_config(cls, cfg) -> FP8Recipe:
        """From a ModelConfig's ``fp8_gemm`` and ``fp8_scale_fmt`` fields."""
        return cls(scale_fmt=cfg.fp8_scale_fmt, gemm=cfg.fp8_gemm)

    def quantize(self, x: torch.Tensor, block) -> QuantizedTensor:
        return quantize(x, block, self.fmt, self.scale_fmt)


# ---------------------------------------------------------------------------------------------- the GEMM
def kernel_available(device: torch.device) -> bool:
    """Can the Triton FP8 GEMM run on this device? CUDA with compute capability >= 8.9 and triton installed, or a
    CPU with ``TRITON_INTERPRET=1`` (the interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    if device.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from .kernels import interpreted  # imported under TRITON_INTERPRET=1: the interpreter is on unless triton was
    # already used without it

    return interpreted()


def resolve_gemm(gemm: str, device: torch.device) -> str:
    """``auto`` → ``kernel`` on a CUDA GPU that runs it, else ``emulate``; ``kernel`` where it cannot run → error."""
    if gemm == "auto":
        return "kernel" if device.type == "cuda" and kernel_available(device) else "emulate"
    if gemm == "kernel" and not kernel_available(device):
        raise ValueError(
            f"fp8_gemm='kernel' runs the Triton FP8 GEMM, which needs triton and a CUDA GPU with compute "
            f"capability >= 8.9 (or TRITON_INTERPRET=1 on a CPU, for tests); the tensors are on "
            f"{device.type}. Use fp8_gemm='emulate' or 'auto'"
        )
    return gemm


def scaled_mm(a: QuantizedTensor, b: QuantizedTensor, out_dtype: torch.dtype, gemm: str = "emulate") -> torch.Tensor:
    """C = A · Bᵀ from FP8 operands quantized along K: a [M, K] in 1×128 tiles, b [N, K] in 128×128 blocks or
    1×128 tiles. Accumulates in FP32 (scales applied per 128-wide chunk of K); returns ``out_dtype`` [M, N]."""
    if a.block != TILE or b.block not in (TILE, BLOCK2D):
        raise ValueError(
            f"scaled_mm needs a in {TILE} tiles and b in {TILE} tiles or {BLOCK2D} blocks (scales "
            f"along K); got {a.block} and {b.block}"
        )
    gemm = resolve_gemm(gemm, a.values.device)
    if gemm == "kernel":
        from .kernels import fp8_gemm

        k = a.shape[-1]
        pad = -k % BLOCK  # the kernel takes whole 128-blocks of K: pad with FP8 zeros (their scales are unused)
        a_data, b_data = (_pad_k(t.data, pad) for t in (a, b))  # real float8 tensors
        return fp8_gemm(a_data, a.scale.contiguous(), b_data, b.scale.contiguous(), out_dtype=out_dtype)
    with torch.autocast(a.values.device.type, enabled=False):
        return torch.mm(a.dequantize(), b.dequantize().t()).to(out_dtype)


def _pad_k(data: torch.Tensor, pad: int) -> torch.Tensor:
    if not pad:
        return data.contiguous()
    out = torch.zeros(data.shape[0], data.shape[1] + pad, dtype=data.dtype, device=data.device)
    out[:, : data.shape[1]] = data
    return out


def transpose(q: QuantizedTensor) -> QuantizedTensor:
    """The same quantized matrix, transposed (blocks and scales transposed with it)."""
    block = None if q.block is None else (q.block[1], q.block[0])
    return QuantizedTensor(q.values.t(), q.scale.t() if q.scale.dim() == 2 else q.scale, block, q.fmt)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


# ---------------------------------------------------------------------------------------------- Linear
class _FP8LinearFunction(torch.autograd.Function):
    """y = x · Wᵀ with FP8 Fprop, Dgrad and Wgrad GEMMs (see the module docstring for the tiling)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, recipe: FP8Recipe) -> torch.Tensor:
        out_dtype = _out_dtype(x)
        x2 = x.reshape(-1, x.shape[-1])  # [M, K], M = tokens
        xq = recipe.quantize(x2, TILE)  # 1×128: per token per 128 input channels
        wq = recipe.quantize(weight, BLOCK2D)  # 128×128 blocks of the FP32 master weight
        y = scaled_mm(xq, wq, out_dtype, recipe.gemm)  # Fprop: [M, N]
        ctx.save_for_backward(xq.values, xq.scale, wq.values, wq.scale)  # x is kept quantized, as the paper caches it
        ctx.recipe, ctx.x_dtype, ctx.x_shape, ctx.w_dtype = recipe, x.dtype, x.shape, weight.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_values, x_scale, w_values, w_scale = ctx.saved_tensors
        recipe: FP8Recipe = ctx.recipe
        xq = QuantizedTensor(x_values, x_scale, TILE, recipe.fmt)
        wq = QuantizedTensor(w_values, w_scale, BLOCK2D, recipe.fmt)
        dy2 = dy.reshape(-1, dy.shape[-1])  # [M, N]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # Dgrad: dx = dy · W, contracting over N: dy in 1×128 tiles along N, W's blocks transposed
            dx = scaled_mm(recipe.quantize(dy2, TILE), transpose(wq), ctx.x_dtype, recipe.gemm).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            # Wgrad: dW = dyᵀ · x, contracting over tokens M: both operands in 128×1 tiles (1×128 of the transposes);
            # x is re-quantized from its stored FP8 copy (dequantize → transpose → quantize, as in the paper)
            dyt_q = recipe.quantize(dy2.t(), TILE)  # [N, M]
            xt_q = recipe.quantize(xq.dequantize().t(), TILE)  # [K, M]
            dw = scaled_mm(dyt_q, xt_q, torch.float32, recipe.gemm).to(ctx.w_dtype)
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: FP8Recipe | None = None) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias) with the three GEMMs in FP8. x [..., K], weight [N, K] -> [..., N]."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"fp8_linear: x has {x.shape[-1]} input features, weight {tuple(weight.shape)} expects {weight.shape[-1]}"
        )
    return _FP8LinearFunction.apply(x, weight, recipe or FP8Recipe())


class FP8Linear(nn.Linear):
    """A drop-in, bias-free ``nn.Linear`` whose Fprop/Dgrad/Wgrad GEMMs run in FP8 (FP32 master weight).

    It *is* an ``nn.Linear`` (same ``weight`` Parameter, same state-dict key), so checkpoints, ``init_weights`` and
    code that reads ``.weight`` directly (MLA's absorbed path) are unaffected.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        recipe: FP8Recipe | None = None,
        device=None,
        dtype=None,
    ):
        if bias:
            raise ValueError("FP8Linear has no bias (DeepSeek-V3's projections have none)")
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.recipe = recipe or FP8Recipe()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.recipe)

    def extra_repr(self) -> str:
        r = self.recipe
        return f"{super().extra_repr()}, fp8={r.fmt}, scale_fmt={r.scale_fmt}, gemm={r.gemm}"


# ---------------------------------------------------------------------------------------------- grouped experts
def segment_tile_quantize(x: torch.Tensor, offs: torch.Tensor, recipe: FP8Recipe) -> SegmentTiled:
    """Quantize x [T, C] in 128×1 tiles along T that never straddle a segment boundary (``offs``: segment ends).

    The Wgrad operands of grouped experts: tokens are sorted by expert, and each expert's tokens are tiled from its
    own first token, exactly as a per-expert ``quantize(x_e.t(), TILE)`` would. Returns a QuantizedTensor of x's
    FP8 values [T, C] and the scale of each element's tile, expanded to [T, C].
    """
    t = x.shape[0]
    ends = offs.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    seg = torch.bucketize(torch.arange(t, device=x.device), ends, right=True)  # segment of each token
    pos = torch.arange(t, device=x.device) - starts[seg]  # position inside its segment
    tiles_per_seg = (ends - starts + BLOCK - 1) // BLOCK
    first_tile = torch.cumsum(tiles_per_seg, 0) - tiles_per_seg
    tile_of = first_tile[seg] + pos // BLOCK  # [T] global tile id
    n_tiles = int(tiles_per_seg.sum())
    fp = fp8_format(recipe.fmt)
    check_finite(x)
    xf = x.float()
    index = tile_of[:, None].expand(-1, x.shape[1])
    amax = xf.new_zeros(n_tiles, x.shape[1]).scatter_reduce_(0, index, xf.abs(), "amax", include_self=True)
    scale = compute_scale(amax, fp.max, recipe.scale_fmt)  # [n_tiles, C]
    s = scale[tile_of]  # [T, C]
    return SegmentTiled(round_to_grid(xf / s, fp.dtype), s)


@dataclass
class SegmentTiled:
    """FP8 values [T, C] (fp32 container) with a per-element (expanded) scale: tiles of 128 tokens in segments."""

    values: torch.Tensor
    scale: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return self.values * self.scale


class _FP8GroupedFunction(torch.autograd.Function):
    """y_e = x_e · W_eᵀ for every expert e over tokens sorted by expert (``offs``: group ends), all three GEMMs in
    FP8 with the Linear tiling, as grouped GEMMs (emulated: quantize → dequantize → ``F.grouped_mm`` in FP32)."""

    @staticmethod
    def forward(ctx, xs: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, recipe: FP8Recipe) -> torch.Tensor:
        out_dtype = _out_dtype(xs)
        xq = recipe.quantize(xs, TILE)  # [T, K] per token per 128 channels
        wq = recipe.quantize(w, BLOCK2D)  # [E, N, K] per expert, 128×128 blocks
        with torch.autocast(xs.device.type, enabled=False):
            y = F.grouped_mm(xq.dequantize(), wq.dequantize().transpose(1, 2), offs=offs).to(out_dtype)
        ctx.save_for_backward(xq.values, xq.scale, wq.values, wq.scale, offs)
        ctx.recipe, ctx.x_dtype, ctx.w_dtype = recipe, xs.dtype, w.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_values, x_scale, w_values, w_scale, offs = ctx.saved_tensors
        recipe: FP8Recipe = ctx.recipe
        x_hat = QuantizedTensor(x_values, x_scale, TILE, recipe.fmt).dequantize()
        w_hat = QuantizedTensor(w_values, w_scale, BLOCK2D, recipe.fmt).dequantize()
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:  # Dgrad: dy 1×128 along N, W blocks: [T, N] x [E, N, K] -> [T, K]
                dx = F.grouped_mm(recipe.quantize(dy, TILE).dequantize(), w_hat, offs=offs).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:  # Wgrad: 128×1 tiles along each expert's tokens: [N, T] x [T, K] -> [E, N, K]
                dy_t = segment_tile_quantize(dy, offs, recipe).dequantize()
                x_t = segment_tile_quantize(x_hat, offs, recipe).dequantize()
                dw = F.grouped_mm(dy_t.t(), x_t, offs=offs).to(ctx.w_dtype)
        return dx, dw, None, None


def _grouped_mm_fp32(device: torch.device) -> bool:
    return hasattr(F, "grouped_mm") and device.type == "cpu"  # CUDA's grouped_mm takes bf16 only


def fp8_grouped_linear(
    xs: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, recipe: FP8Recipe | None = None
) -> torch.Tensor:
    """Grouped ``xs[group e] · w[e]ᵀ`` in FP8: xs [T, K] sorted by group, w [E, N, K], offs [E] int32 group ends."""
    if w.dim() != 3 or xs.dim() != 2 or xs.shape[1] != w.shape[2] or offs.shape != (w.shape[0],):
        raise ValueError(
            f"fp8_grouped_linear: expected xs [T, K], w [E, N, K], offs [E]; got {tuple(xs.shape)}, "
            f"{tuple(w.shape)}, {tuple(offs.shape)}"
        )
    recipe = recipe or FP8Recipe()
    if resolve_gemm(recipe.gemm, xs.device) == "kernel" or not _grouped_mm_fp32(xs.device):
        # one block-scaled FP8 GEMM per expert: the same tiles (each expert's tokens are tiled from its first token)
        outs, start = [], 0
        for e, end in enumerate(offs.tolist()):
            if end > start:
                outs.append(fp8_linear(xs[start:end], w[e], recipe))
            start = end
        return torch.cat(outs) if outs else xs.new_zeros(0, w.shape[1])
    return _FP8GroupedFunction.apply(xs, w, offs, recipe)


__all__ = [
    "FP8Recipe",
    "FP8Linear",
    "fp8_linear",
    "fp8_grouped_linear",
    "scaled_mm",
    "transpose",
    "resolve_gemm",
    "kernel_available",
    "segment_tile_quantize",
]
