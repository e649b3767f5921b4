"""Comparing an FP8 run with its BF16 twin (DeepSeek-V3 App. B.1: "relative loss error ... below 0.25%").

Both runs start from the same initialisation and see the same batches, so their per-step losses pair up. Single-step
losses are noisy (each step is one batch), so the comparison is made on smoothed curves:

    L̃(t) = EMA_α(L)(t)  (s_0 = L_0, s_t = (1 − α) s_(t−1) + α L_t),    rel_diff(t) = |L̃_fp8(t) − L̃_bf16(t)| / L̃_bf16(t)

Used by experiment E4 (``dsv3lab reproduce --only fp8``) and notebook 07_fp8.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

EMA_ALPHA = 0.1
PAPER_THRESHOLD = 0.0025  # 0.25%


def ema(values, alpha: float = EMA_ALPHA) -> np.ndarray:
    """Exponential moving average started at the first value: s_0 = x_0, s_t = (1 − α) s_(t−1) + α x_t."""
    values = np.asarray(values, dtype=float)
    out = np.empty(len(values))
    acc = float(values[0]) if len(values) else 0.0
    for i, v in enumerate(values):
        acc = acc if i == 0 else (1 - alpha) * acc + alpha * float(v)
        out[i] = acc
    return out


def loss_curves(bf16: pd.DataFrame, fp8: pd.DataFrame, seed: int = 0, alpha: float = EMA_ALPHA) -> pd.DataFrame:
    """Per step: raw and smoothed main losses of both runs and ``rel_diff``. Inputs: per-step frames with ``step``,
    ``loss_main`` (and optionally ``time_s``), as the trainer's ``RunResult.metrics``."""
    if len(bf16) != len(fp8) or not np.array_equal(bf16["step"].to_numpy(), fp8["step"].to_numpy()):
        raise ValueError(f"the two runs must have the same steps to be compared (got {len(bf16)} and {len(fp8)} rows)")
    a, b = bf16["loss_main"].to_numpy(), fp8["loss_main"].to_numpy()
    sa, sb = ema(a, alpha), ema(b, alpha)
    out = pd.DataFrame(
        {
            "step": bf16["step"].to_numpy(),
            "seed": seed,
            "raw_bf16": a,
            "raw_fp8": b,
            "loss_bf16": sa,
            "loss_fp8": sb,
            "rel_diff": np.abs(sb - sa) / sa,
        }
    )
    if "time_s" in bf16 and "time_s" in fp8:
        out["time_bf16_s"], out["time_fp8_s"] = bf16["time_s"].to_numpy(), fp8["time_s"].to_numpy()
    return out
