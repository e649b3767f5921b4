"""Triton kernels for block-scaled FP8 (DeepSeek-V3 §3.3; the official ``inference/kernel.py`` has the same three).

* :func:`act_quant`      x [..., K] → E4M3 values and one fp32 scale per 1×128 tile (optionally UE8M0);
* :func:`weight_dequant` E4M3 weight [M, N] and its [⌈M/128⌉, ⌈N/128⌉] block scales → a high-precision weight;
* :func:`fp8_gemm`       C = A · Bᵀ for E4M3 operands with scales along K: the tensor cores multiply one
  128-wide block of K at a time (``tl.dot`` on FP8), and after each block the partial sum is multiplied by its two
  scales and added to an FP32 accumulator — the paper's promotion every N_C = 128 elements (Fig. 7b);
* :func:`fp8_grouped_gemm` the same for MoE experts: rows sorted by expert, one weight per expert.

Every kernel equals the torch reference of :mod:`dsv3lab.fp8.quant` (the tests run both under ``TRITON_INTERPRET=1``
on a CPU and compare, boundary values included).

Two details worth reading:

1. **Rounding onto the E4M3 grid in fp32.** Triton 3.9's interpreter casts float → float8e4nv wrongly when the
   rounding carries into the exponent (126.2 becomes 64 instead of 128; 464 becomes NaN; tiny values flush
   early). :func:`_round_to_e4m3` therefore rounds in fp32 first, with the classic "magic number" trick: for
   2^e ≤ |v| < 2^(e+1), the constant c = 1.5·2^(e+20) has an ulp of exactly 2^(e-3), the E4M3 spacing there, so
   ``(v + c) - c`` is v rounded to nearest-even on that grid (the exponent is read from v's bits; below 2^-6 the
   subnormal spacing 2^-9 is used). The cast of an exactly representable value is then exact on every backend.
2. **Exact division.** ``x / s`` uses ``tl.math.div_rn`` (IEEE round-to-nearest), like torch, so the scales and
   FP8 values are bit-identical to the reference; Triton's plain ``/`` is an approximate division on GPUs.

Bad input (K not a multiple of 128, non-contiguous tensors, wrong dtypes or scale shapes) raises ``ValueError``.
This module imports triton at import time; ``dsv3lab`` and ``dsv3lab.fp8`` import it only when a kernel is asked
for. On a CPU set ``TRITON_INTERPRET=1`` *before triton is first imported in the process*: Triton reads it whenever
``@triton.jit`` decorates a function, and triton.language's own helpers (``tl.zeros``, ``tl.cdiv``) are decorated at
``import triton`` — which torch itself may trigger (building a model on this CPU wheel does) and which
``dsv3lab.versions()`` triggers to report its version. :func:`interpreted` tells whether it worked.

Notebook: 07_fp8. Benchmark: ``benchmarks/fp8_gemm.py``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .formats import E4M3, E4M3_MAX
from .quant import AMAX_FLOOR, BLOCK, resolve_scale_fmt


def interpreted() -> bool:
    """True when the kernels run in triton's CPU interpreter.

    Triton reads ``TRITON_INTERPRET`` each time a function is decorated with ``@triton.jit``: triton.language's own
    helpers (``tl.zeros``, ``tl.cdiv``, …) are decorated when triton is first imported, this module's kernels when
    it is imported. Both must have happened with the variable set, so the answer is read off those function objects,
    not off the environment now.
    """
    kinds = {type(_act_quant_kernel).__name__, type(tl.standard.zeros).__name__}
    return kinds == {"InterpretedFunction"}


def _check_device(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        raise ValueError(f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    if dev.type == "cuda":
        return
    if dev.type == "cpu" and interpreted():
        return
    raise ValueError(
        f"the Triton FP8 kernels run on CUDA, or on a CPU under TRITON_INTERPRET=1 set before triton is "
        f"first imported in this process (note: torch and dsv3lab.versions() may import it); got tensors "
        f"on {dev.type}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}, interpreter active: "
        f"{interpreted()}"
    )


def _check_contiguous(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(
                f"{name} must be contiguous (strides {t.stride()} for shape {tuple(t.shape)}); call .contiguous() first"
            )


# ---------------------------------------------------------------------------------------------- device helpers
@triton.jit
def _round_to_e4m3(v):
    """fp32 v (|v| ≲ 448) rounded to nearest-even on the E4M3 grid and clamped to ±448, still fp32."""
    bits = v.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127  # floor(log2 |v|) for normal fp32 (−127 for 0)
    e = tl.maximum(e, -6)  # E4M3 subnormals share the spacing of the lowest binade: 2^-9
    c = (((e + 20 + 127) << 23) | 0x400000).to(tl.float32, bitcast=True)  # 1.5 · 2^(e+20): ulp = 2^(e-3)
    r = tl.minimum(tl.maximum((v + c) - c, -E4M3_MAX), E4M3_MAX)
    return tl.where(v < 0, -tl.abs(r), r)  # a negative value that rounds to zero stays -0, as the cast gives


@triton.jit
def _to_output(v, dtype: tl.constexpr):
    """Cast fp32 v to the output dtype. BF16 is rounded to nearest-even in fp32 first (same trick, 7 mantissa bits:
    c = 1.5·2^(e+16)), because the interpreter's fp32 → bf16 cast truncates; on a GPU this is a no-op refinement."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        e = tl.minimum(tl.maximum(((bits >> 23) & 0xFF) - 127, -126), 111)
        c = (((e + 16 + 127) << 23) | 0x400000).to(tl.float32, bitcast=True)
        v = (v + c) - c
    return v.to(dtype)


@triton.jit
def _pow2_ceil(s):
    """The smallest power of two >= s for positive normal fp32 s (UE8M0 scales), via the exponent bits."""
    bits = s.to(tl.int32, bitcast=True)
    exponent = (bits >> 23) & 0xFF
    exponent = tl.where((bits & 0x7FFFFF) != 0, exponent + 1, exponent)
    return (exponent << 23).to(tl.float32, bitcast=True)


# ---------------------------------------------------------------------------------------------- act_quant
@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, amax_floor, BLOCK_SIZE: tl.constexpr, POW2: tl.constexpr):
    # one program = one 1×128 tile: 128 contiguous channels of one token
    pid = tl.program_id(0)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    x = tl.load(x_ptr + offs).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x)), amax_floor)
    s = tl.math.div_rn(amax, E4M3_MAX)
    if POW2:
        s = _pow2_ceil(s)
    y = _round_to_e4m3(tl.math.div_rn(x, s))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty))
    tl.store(s_ptr + pid, s)


def act_quant(
    x: torch.Tensor, block_size: int = BLOCK, scale_fmt: str = "fp32", amax_floor: float = AMAX_FLOOR
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [..., K] (fp32/bf16/fp16, contiguous, K % 128 == 0) per 1×128 tile.

    Returns E4M3 values [..., K] and fp32 scales [..., K/128] with x ≈ y · s; equal to
    ``dsv3lab.fp8.quantize(x, (1, 128), scale_fmt=scale_fmt)``.
    """
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"act_quant takes fp32, bf16 or fp16 input, got {x.dtype}")
    if block_size != BLOCK:
        raise ValueError(f"act_quant uses 1×{BLOCK} tiles, got block_size={block_size}")
    scale_fmt = resolve_scale_fmt(scale_fmt)
    if x.dim() < 1 or x.shape[-1] % BLOCK:
        raise ValueError(
            f"act_quant needs the last dimension K to be a multiple of {BLOCK}, got shape "
            f"{tuple(x.shape)}; zero-pad K first"
        )
    _check_contiguous(x=x)
    _check_device(x)
    y = torch.empty_like(x, dtype=E4M3)
    s = torch.empty(*x.shape[:-1], x.shape[-1] // BLOCK, dtype=torch.float32, device=x.device)
    if x.numel():
        _act_quant_kernel[(x.numel() // BLOCK,)](x, y, s, amax_floor, BLOCK_SIZE=BLOCK, POW2=scale_fmt == "ue8m0")
    return y, s


# ---------------------------------------------------------------------------------------------- weight_dequant
@triton.jit
def _weight_dequant_kernel(x_ptr, s_ptr, y_ptr, M, N, BLOCK_SIZE: tl.constexpr):
    # one program = one 128×128 block; edge blocks are masked
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    n_blocks_n = tl.cdiv(N, BLOCK_SIZE)
    rm = pid_m * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    rn = pid_n * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None] * N + rn[None, :]
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    s = tl.load(s_ptr + pid_m * n_blocks_n + pid_n)
    tl.store(y_ptr + offs, _to_output(x * s, y_ptr.dtype.element_ty), mask=mask)


def weight_dequant(x: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """E4M3 weight x [M, N] times its block scales s [⌈M/128⌉, ⌈N/128⌉] → [M, N] in ``out_dtype``."""
    if x.dtype != E4M3 or x.dim() != 2:
        raise ValueError(f"weight_dequant takes a 2-D float8_e4m3fn weight, got {x.dtype} {tuple(x.shape)}")
    m, n = x.shape
    expected = (triton.cdiv(m, BLOCK), triton.cdiv(n, BLOCK))
    if s.dtype != torch.float32 or tuple(s.shape) != expected:
        raise ValueError(
            f"weight_dequant: scales must be fp32 of shape {expected} for a {m}×{n} weight "
            f"({BLOCK}×{BLOCK} blocks), got {s.dtype} {tuple(s.shape)}"
        )
    _check_out_dtype(out_dtype)
    _check_contiguous(x=x, s=s)
    _check_device(x, s)
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if x.numel():
        _weight_dequant_kernel[expected](x, s, y, m, n, BLOCK_SIZE=BLOCK)
    return y


# ---------------------------------------------------------------------------------------------- fp8_gemm
@triton.jit
def _fp8_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    a_s_ptr,
    b_s_ptr,
    M,
    N,
    K,
    B_ROWWISE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # C[M, N] = A[M, K] · B[N, K]ᵀ; A scales [M, K/128]; B scales [⌈N/128⌉, K/128] (blocks) or [N, K/128] (rows)
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m, mask_n = rm < M, rn < N
    n_kb = K // BLOCK_K
    b_scale_row = rn if B_ROWWISE else rn // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the FP32 accumulator (CUDA-core registers)
    for kb in range(n_kb):
        k = kb * BLOCK_K + rk
        a = tl.load(a_ptr + rm[:, None] * K + k[None, :], mask=mask_m[:, None], other=0.0)  # [BM, BK]
        b = tl.load(b_ptr + rn[None, :] * K + k[:, None], mask=mask_n[None, :], other=0.0)  # Bᵀ tile [BK, BN]
        a_s = tl.load(a_s_ptr + rm * n_kb + kb, mask=mask_m, other=0.0)
        b_s = tl.load(b_s_ptr + b_scale_row * n_kb + kb, mask=mask_n, other=0.0)
        partial = tl.dot(a, b)  # FP8 tensor cores over one 128-wide block of K
        acc += partial * a_s[:, None] * b_s[None, :]  # promotion: scale in FP32, add to the FP32 accumulator
    c = _to_output(acc, c_ptr.dtype.element_ty)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], c, mask=mask_m[:, None] & mask_n[None, :])


_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128}, num_stages=st, num_warps=w)
    for bm in (64, 128)
    for bn in (64, 128)
    for st in (3, 4)
    for w in (4, 8)
]
_fp8_gemm_autotuned = triton.autotune(configs=_GEMM_CONFIGS, key=["N", "K", "B_ROWWISE"])(_fp8_gemm_kernel)
_INTERPRETER_TILE = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": BLOCK}  # small tiles: the interpreter is slow


def _check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"out_dtype must be torch.bfloat16 or torch.float32, got {out_dtype}")


def _check_gemm_operand(name: str, t: torch.Tensor, s: torch.Tensor, rowwise: bool) -> None:
    if t.dtype != E4M3 or t.dim() != 2:
        raise ValueError(f"fp8_gemm: {name} must be a 2-D float8_e4m3fn matrix, got {t.dtype} {tuple(t.shape)}")
    rows, k = t.shape
    if k % BLOCK:
        raise ValueError(
            f"fp8_gemm: K = {k} is not a multiple of {BLOCK} ({name} has shape {tuple(t.shape)}); the "
            f"kernel promotes once per {BLOCK}-wide block of K, so zero-pad K first"
        )
    if s.dtype != torch.float32:
        raise ValueError(f"fp8_gemm: {name}'s scales must be fp32, got {s.dtype}")
    if rowwise and tuple(s.shape) != (rows, k // BLOCK):
        raise ValueError(
            f"fp8_gemm: {name}'s scales must have shape {(rows, k // BLOCK)} (1×{BLOCK} tiles), got {tuple(s.shape)}"
        )


def fp8_gemm(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """C = A · Bᵀ in FP8 with FP32 promotion per 128-block of K.

    Args:
        a: E4M3 [M, K] (K % 128 == 0), with ``a_s`` fp32 [M, K/128] (1×128 tiles, as :func:`act_quant` makes).
        b: E4M3 [N, K], with ``b_s`` fp32 [⌈N/128⌉, K/128] (128×128 blocks, a weight) or [N, K/128] (1×128 tiles,
            e.g. the Wgrad operand).
        out_dtype: bf16 (default, as the official kernel) or fp32; rounded to nearest-even.
    Returns: [M, N] in ``out_dtype``.
    """
    _check_gemm_operand("a", a, a_s, rowwise=True)
    if b.dim() != 2 or b.shape[-1] != a.shape[-1]:
        raise ValueError(f"fp8_gemm: a {tuple(a.shape)} and b {tuple(b.shape)} must share K (C = A·Bᵀ, b is [N, K])")
    m, k = a.shape
    n = b.shape[0]
    blocked = (triton.cdiv(n, BLOCK), k // BLOCK)
    rowwise = tuple(b_s.shape) == (n, k // BLOCK)
    if not rowwise and tuple(b_s.shape) != blocked:
        raise ValueError(
            f"fp8_gemm: b's scales must have shape {blocked} ({BLOCK}×{BLOCK} blocks) or "
            f"{(n, k // BLOCK)} (1×{BLOCK} tiles), got {tuple(b_s.shape)}"
        )
    _check_gemm_operand("b", b, b_s, rowwise=rowwise)
    _check_out_dtype(out_dtype)
    _check_contiguous(a=a, a_s=a_s, b=b, b_s=b_s)
    _check_device(a, a_s, b, b_s)
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    if interpreted():
        meta = _INTERPRETER_TILE
        grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
        _fp8_gemm_kernel[grid](a, b, c, a_s, b_s, m, n, k, B_ROWWISE=rowwise, **meta)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
        _fp8_gemm_autotuned[grid](a, b, c, a_s, b_s, m, n, k, B_ROWWISE=rowwise)
    return c


# ---------------------------------------------------------------------------------------------- grouped GEMM
@triton.jit
def _fp8_grouped_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    a_s_ptr,
    b_s_ptr,
    ends_ptr,
    N,
    K,
    TILES_PER_GROUP,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # rows of A are sorted by group; group g owns rows [ends[g-1], ends[g]) and multiplies weight B[g] [N, K]
    pid, pid_n = tl.program_id(0), tl.program_id(1)
    g = pid // TILES_PER_GROUP
    tile = pid % TILES_PER_GROUP
    start = tl.where(g > 0, tl.load(ends_ptr + g - 1, mask=g > 0, other=0), 0)
    end = tl.load(ends_ptr + g)
    rm = start + tile * BLOCK_M + tl.arange(0, BLOCK_M)
    if start + tile * BLOCK_M < end:  # programs past the end of a small group do nothing
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mask_m, mask_n = rm < end, rn < N
        n_kb = K // BLOCK_K
        n_bn = tl.cdiv(N, BLOCK_K)
        b_base = b_ptr + g.to(tl.int64) * N * K
        b_s_base = b_s_ptr + g * n_bn * n_kb
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(n_kb):
            k = kb * BLOCK_K + rk
            a = tl.load(a_ptr + rm[:, None] * K + k[None, :], mask=mask_m[:, None], other=0.0)  # [BM, BK]
            b = tl.load(b_base + rn[None, :] * K + k[:, None], mask=mask_n[None, :], other=0.0)  # [BK, BN]
            a_s = tl.load(a_s_ptr + rm * n_kb + kb, mask=mask_m, other=0.0)
            b_s = tl.load(b_s_base + (rn // BLOCK_K) * n_kb + kb, mask=mask_n, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        tl.store(
            c_ptr + rm[:, None] * N + rn[None, :],
            _to_output(acc, c_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_n[None, :],
        )


def fp8_grouped_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    offs: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Grouped C_g = A_g · B_gᵀ for MoE experts: a [T, K] E4M3 with rows sorted by group and scales [T, K/128];
    b [G, N, K] E4M3 with 128×128 block scales [G, ⌈N/128⌉, K/128]; offs [G] int32 group ends. Returns [T, N]."""
    _check_gemm_operand("a", a, a_s, rowwise=True)
    if b.dtype != E4M3 or b.dim() != 3 or b.shape[-1] != a.shape[-1]:
        raise ValueError(
            f"fp8_grouped_gemm: b must be float8_e4m3fn [G, N, K] with K = {a.shape[-1]}, got "
            f"{b.dtype} {tuple(b.shape)}"
        )
    g, n, k = b.shape
    expected = (g, triton.cdiv(n, BLOCK), k // BLOCK)
    if b_s.dtype != torch.float32 or tuple(b_s.shape) != expected:
        raise ValueError(f"fp8_grouped_gemm: b's scales must be fp32 {expected}, got {b_s.dtype} {tuple(b_s.shape)}")
    if offs.dim() != 1 or offs.shape[0] != g or offs.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"fp8_grouped_gemm: offs must be an integer vector of the {g} group ends, got "
            f"{offs.dtype} {tuple(offs.shape)}"
        )
    ends = offs.to(torch.int32)
    if g and (int(ends[-1]) != a.shape[0] or bool((ends[1:] < ends[:-1]).any()) or int(ends[0]) < 0):
        raise ValueError(
            f"fp8_grouped_gemm: offs must be non-decreasing group ends finishing at T = {a.shape[0]}, "
            f"got {offs.tolist()}"
        )
    _check_out_dtype(out_dtype)
    _check_contiguous(a=a, a_s=a_s, b=b, b_s=b_s)
    _check_device(a, a_s, b, b_s, ends)
    c = torch.zeros(a.shape[0], n, dtype=out_dtype, device=a.device)
    if a.shape[0] == 0 or n == 0:
        return c
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    meta = _INTERPRETER_TILE if interpreted() else {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": BLOCK}
    tiles = triton.cdiv(int(counts.max()), meta["BLOCK_M"])
    grid = (g * tiles, triton.cdiv(n, meta["BLOCK_N"]))
    _fp8_grouped_gemm_kernel[grid](a, b, c, a_s, b_s, ends.contiguous(), n, k, tiles, **meta)
    return c
