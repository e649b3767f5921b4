"""Accumulation precision: why FP8 GEMMs must promote partial sums to FP32 (DeepSeek-V3 §3.3.2, "Increasing
Accumulation Precision").

An FP8 GEMM multiplies FP8 operands exactly, but it has to *add* K products per output. On H800 (Hopper) the FP8
tensor cores do not keep a full FP32 sum: the paper reports that the products of one MMA step are aligned to the
largest exponent by right-shifting, and only about the **top 14 bits** take part in the addition; everything shifted
further right is truncated. Once the running sum is large, every new product loses its low bits (or vanishes
entirely), and the error grows with K: the paper measures a maximum relative error of nearly 2% at K = 4096.

The fix (Fig. 7b): after every ``N_C = 128`` elements of K (4 WGMMAs) the tensor-core partial sum is copied to
FP32 registers on the CUDA cores, multiplied there by the two 128-block scales, and added to a full-precision FP32
accumulator. The limited accumulator then restarts from zero, so it never holds more than 128 products' worth.

This module emulates that arithmetic, vectorised over all outputs of a GEMM ``C = A · Bᵀ``:

1. the products of one group of ``group`` = 32 K-elements (one MMA instruction's K for FP8) are formed exactly in
   fp64 (an E4M3 × E4M3 product has at most 8 significant bits);
2. the group's products *and the current accumulator* are aligned to the largest magnitude among them: with
   2^(e-1) ≤ max < 2^e, every addend is truncated toward zero to a multiple of 2^(e − ``acc_bits``), i.e. only the
   top ``acc_bits`` bits below the leading one survive — the "14 bits" of the paper;
3. the aligned addends are summed exactly (fixed point; fp64 holds it exactly while acc_bits ≤ 47);
4. with promotion, every ``promote_every`` = N_C elements the partial sum is added into the outer accumulator
   (rounded to ``promote_dtype``, FP32 by default) and the limited accumulator restarts at zero.

With ``acc_bits=None`` nothing is truncated, and with no promotion (or fp64 promotion) the emulator returns the
exact sum: for FP8-valued operands the fp64 result equals the mathematically exact dot product, which the tests
check bit for bit. How the alignment treats the accumulator, and truncation instead of rounding, are a model of the
behaviour the paper describes, not a bit-exact replica of undocumented hardware.

Notebook: 07_fp8.
"""

from __future__ import annotations

import pandas as pd
import torch

from .quant import TILE, quantize

MMA_K = 32  # K elements of one FP8 WGMMA instruction
N_C = 128  # the paper's promotion interval


def aligned_sum(acc: torch.Tensor, products: torch.Tensor, acc_bits: int | torch.Tensor | None) -> torch.Tensor:
    """One tensor-core accumulation step: acc [...] + Σ products [..., g] keeping only ``acc_bits`` aligned bits.

    All g + 1 addends are aligned to the largest |addend| (2^(e-1) ≤ max < 2^e) and truncated toward zero to a
    multiple of 2^(e - acc_bits); the truncated addends are summed exactly. fp64 in, fp64 out. ``acc_bits`` may be a
    tensor broadcasting against acc (several precisions at once).
    """
    addends = torch.cat([acc[..., None], products], dim=-1)  # [..., g + 1]
    if acc_bits is None:
        return addends.sum(-1)
    _, e = torch.frexp(addends.abs().amax(-1, keepdim=True))  # max = f · 2^e, f in [0.5, 1)
    if isinstance(acc_bits, torch.Tensor):
        acc_bits = acc_bits[..., None]
    quantum = torch.ldexp(torch.ones_like(addends[..., :1]), e - acc_bits)
    return (torch.trunc(addends / quantum) * quantum).sum(-1)  # division by a power of two is exact


def _check_setting(acc_bits, promote_every, group: int) -> None:
    for bits in torch.as_tensor(acc_bits).flatten().tolist() if acc_bits is not None else []:
        if not 1 <= bits <= 47:
            raise ValueError(
                f"acc_bits must be in [1, 47] (fp64 must hold the aligned sum exactly) or None, got {bits}"
            )
    for every in torch.as_tensor(promote_every).flatten().tolist() if promote_every is not None else []:
        if every and (every < group or every % group):
            raise ValueError(f"promote_every (N_C) must be a positive multiple of group={group}, got {every}")


def emulated_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    acc_bits: int | None = 14,
    promote_every: int | None = N_C,
    group: int = MMA_K,
    promote_dtype: torch.dtype = torch.float32,
    snapshots: tuple[int, ...] | None = None,
) -> torch.Tensor | dict[int, torch.Tensor]:
    """C = a · bᵀ for a [M, K], b [N, K] with a limited-precision accumulator. Returns fp64 [M, N].

    Args:
        acc_bits: bits kept when adding (14 on H800; ``None`` = exact). A sequence of M values gives each row of
            ``a`` its own precision (to sweep several settings in one pass).
        promote_every: N_C, promote the partial sum to the ``promote_dtype`` accumulator every this many K elements
            (a multiple of ``group``); ``None`` = never (the tensor-core accumulator holds the whole sum). A sequence
            of M values (0 = never) gives each row its own interval.
        group: products aligned together (32 = one FP8 MMA).
        promote_dtype: the outer accumulator (FP32 registers on the CUDA cores).
        snapshots: K values (multiples of ``group``) at which to also return the result of the GEMM over the first K
            columns (each exactly what a separate call on ``a[:, :K]``, ``b[:, :K]`` returns); gives ``{K: C}``.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected a [M, K] and b [N, K] with the same K, got {tuple(a.shape)} and {tuple(b.shape)}")
    _check_setting(acc_bits, promote_every, group)
    m, k = a.shape
    n = b.shape[0]
    bad = [s for s in snapshots or () if s % group or not 0 < s <= k]
    if bad:
        raise ValueError(f"snapshots must be multiples of group={group} in (0, K={k}], got {bad}")
    a64, b64 = a.double(), b.double()
    bits = None if acc_bits is None else torch.as_tensor(acc_bits).reshape(-1, 1).expand(m, 1)
    every = (
        torch.zeros(m, 1, dtype=torch.long)
        if promote_every is None
        else torch.as_tensor(promote_every, dtype=torch.long).reshape(-1, 1).expand(m, 1)
    )
    promoting = every > 0  # [M, 1]
    acc = a64.new_zeros(m, n)  # the tensor-core accumulator
    outer = a64.new_zeros(m, n)  # the promoted accumulator (CUDA-core registers)
    out: dict[int, torch.Tensor] = {}
    for k0 in range(0, k, group):
        k1 = min(k0 + group, k)
        products = a64[:, None, k0:k1] * b64[None, :, k0:k1]  # [M, N, g], exact
        acc = aligned_sum(acc, products, bits)
        if k1 in (snapshots or ()) or k1 == k:  # a GEMM ending here promotes its last partial sum
            out[k1] = torch.where(promoting, (outer + acc).to(promote_dtype).double(), acc)
        due = promoting & (k1 % every.clamp_min(1) == 0)  # [M, 1]: rows whose interval ends here
        if bool(due.any()):
            outer = torch.where(due, (outer + acc).to(promote_dtype).double(), outer)  # one add in the outer precision
            acc = torch.where(due, torch.zeros_like(acc), acc)
    return {s: out[s] for s in snapshots} if snapshots else out[k]


def fp8_operands(m: int, n: int, k: int, dist: str = "normal", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random a [M, K], b [N, K] quantized to E4M3 with 1×128 tiles and returned as their FP8 *values* (fp64),
    i.e. what the tensor cores multiply (scales are applied at promotion and do not change relative errors).

    ``dist``: ``"normal"`` (zero-mean, sums grow like sqrt(K)) or ``"positive"`` (|normal|, sums grow like K,
    the case where the running sum dwarfs each new product).
    """
    if dist not in ("normal", "positive"):
        raise ValueError(f"dist must be 'normal' or 'positive', got {dist!r}")
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    if dist == "positive":
        a, b = a.abs(), b.abs()
    return quantize(a, TILE).values.double(), quantize(b, TILE).values.double()


def gemm_error(approx: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """max relative error max |ΔC|/|C| over elements (|C| floored at 1e-3·max|C| so near-zero outputs don't
    dominate), normwise relative error ‖ΔC‖/‖C‖, and the max error relative to max|C|."""
    diff = (approx - exact).abs()
    floor = 1e-3 * exact.abs().max()
    return {
        "max_rel_error": float((diff / exact.abs().clamp_min(floor)).max()),
        "norm_rel_error": float(diff.norm() / exact.norm()),
        "max_error_over_max": float(diff.max() / exact.abs().max()),
    }


def accumulation_sweep(
    ks: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192),
    m: int = 32,
    n: int = 32,
    acc_bits: int = 14,
    promote_every: int = N_C,
    dists: tuple[str, ...] = ("positive", "normal"),
    seeds: tuple[int, ...] = (0,),
) -> pd.DataFrame:
    """Error of the emulated FP8 GEMM vs the exact sum for each K, with and without promotion.

    One row per (dist, K, promotion, seed) with :func:`gemm_error` columns; ``promotion`` is ``"none"`` or
    ``"every N_C"``. Each K uses the first K columns of one set of operands (one pass with snapshots)."""
    rows = []
    for dist in dists:
        for seed in seeds:
            a, b = fp8_operands(m, n, max(ks), dist, seed)
            both = torch.cat([a, a])  # rows 0..m-1 without promotion, m..2m-1 with
            per_row = [0] * m + [promote_every] * m
            snaps = emulated_gemm(both, b, acc_bits=acc_bits, promote_every=per_row, snapshots=tuple(ks))
            for k in ks:
                exact = a[:, :k] @ b[:, :k].T  # fp64: exact for FP8-valued operands of this size
                for label, part in (("none", snaps[k][:m]), (f"every {promote_every}", snaps[k][m:])):
                    rows.append(
                        {
                            "dist": dist,
                            "K": k,
                            "promotion": label,
                            "seed": seed,
                            "acc_bits": acc_bits,
                            **gemm_error(part, exact),
                        }
                    )
    return pd.DataFrame(rows)


SWEEP_OPERANDS = {"m": 32, "n": 32, "k": 4096, "dist": "positive", "seed": 0}  # the fixed-K sweeps' operands


def _settings_sweep(settings: list[dict], operands: dict) -> pd.DataFrame:
    """One emulated GEMM pass for several accumulator settings (each a dict with ``acc_bits`` and ``promote_every``
    plus labels): M rows of the same operands per setting, the error of each block of rows against the exact sum.
    ``operands``: overrides of :data:`SWEEP_OPERANDS` (m, n, k, dist, seed of :func:`fp8_operands`)."""
    ops = {**SWEEP_OPERANDS, **operands}
    m = ops["m"]
    a, b = fp8_operands(**ops)
    exact = a @ b.T
    per_row = {key: [st[key] for st in settings for _ in range(m)] for key in ("acc_bits", "promote_every")}
    c = emulated_gemm(a.repeat(len(settings), 1), b, **per_row)  # [len(settings) * m, n] in one pass
    rows = []
    for i, st in enumerate(settings):
        labels = {key: v for key, v in st.items() if key != "promote_every"}
        rows.append({**labels, "K": ops["k"], "dist": ops["dist"], **gemm_error(c[i * m : (i + 1) * m], exact)})
    return pd.DataFrame(rows)


def promotion_interval_sweep(n_cs=(32, 64, 128, 256, 512, 1024, 2048, 4096), acc_bits: int = 14, **operands):
    """Error at fixed K as the promotion interval N_C grows (N_C = K means a single promotion at the end).

    ``operands``: m, n, k, dist, seed (default :data:`SWEEP_OPERANDS`: 32 × 32 outputs, K = 4096, positive)."""
    return _settings_sweep([{"N_C": n_c, "acc_bits": acc_bits, "promote_every": n_c} for n_c in n_cs], operands)


def accumulator_bits_sweep(bits=(12, 13, 14, 15, 16, 18, 20, 24), promote_every: int = N_C, **operands):
    """Error at fixed K as the accumulator keeps more bits, without and with promotion every ``promote_every``.

    The paper's "about 14 bits" is an approximate description of undocumented hardware, and the error scales as
    2^-bits: this sweep shows how much a one- or two-bit difference in the model moves the K = 4096 number.
    ``operands``: as :func:`promotion_interval_sweep`."""
    promotions = (("none", 0), (f"every {promote_every}", promote_every))
    settings = [{"acc_bits": nb, "promotion": lab, "promote_every": every} for nb in bits for lab, every in promotions]
    return _settings_sweep(settings, operands)
