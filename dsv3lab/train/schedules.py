"""The paper's schedules (DeepSeek-V3 §4.2) as pure functions of (step, total_steps, config).

``step`` is the 0-based index of an optimizer step, ``total`` the number of steps in the run. Positions are fractions
``step / total`` of the run, so the shapes are those of the paper's 14.8T-token run scaled to any length:

    learning rate  ──/‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾\\___‾‾‾‾‾‾▁▁   warm-up, constant, cosine, constant, final constant
    batch size     _/‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾   linear ramp in sequences per step
    MTP λ          ‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾\\__________  0.3, then 0.1
    bias γ         ‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾\\_   γ, then 0 for the last 500B tokens

Notebook: 06_pretraining.
"""

from __future__ import annotations

import math

import pandas as pd

from .config import TrainConfig


def _frac(step: int, total: int) -> float:
    if total < 1:
        raise ValueError(f"total_steps must be >= 1, got {total}")
    if not 0 <= step < total:
        raise ValueError(f"step must be in [0, total_steps={total}), got {step}")
    return step / total


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step``: warm-up, constant, cosine decay, constant, final constant."""
    f = _frac(step, total)
    peak = cfg.lr
    warm_steps = cfg.warmup_frac * total
    if step < warm_steps:
        return peak * (step + 1) / math.ceil(warm_steps)  # linear 0 -> peak; the first step is not at lr 0
    if f < cfg.lr_decay_start_frac:
        return peak
    if f < cfg.lr_decay_end_frac:
        t = (f - cfg.lr_decay_start_frac) / (cfg.lr_decay_end_frac - cfg.lr_decay_start_frac)
        low = cfg.lr_min_ratio
        return peak * (low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * t)))
    if f < cfg.lr_final_frac:
        return peak * cfg.lr_min_ratio
    return peak * cfg.lr_final_ratio


def batch_size_at(step: int, total: int, cfg: TrainConfig) -> int:
    """Sequences in optimizer step ``step``: a linear ramp from the start size to ``batch_size``."""
    f = _frac(step, total)
    start, end = cfg.effective_batch_size_start, cfg.batch_size
    if cfg.batch_ramp_frac <= 0 or f >= cfg.batch_ramp_frac:
        return end
    return int(round(start + (end - start) * f / cfg.batch_ramp_frac))


def mtp_lambda_at(step: int, total: int, cfg: TrainConfig) -> float:
    """MTP loss weight λ: ``mtp_lambda`` (0.3) for the first part of the run, then ``mtp_lambda_final`` (0.1)."""
    return cfg.mtp_lambda if _frac(step, total) < cfg.mtp_lambda_switch_frac else cfg.mtp_lambda_final


def bias_speed_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Bias update speed γ: ``bias_update_speed`` until ``bias_freeze_frac``, then 0; always 0 without the update."""
    if not cfg.bias_updated:
        _frac(step, total)
        return 0.0
    return cfg.bias_update_speed if _frac(step, total) < cfg.bias_freeze_frac else 0.0


def schedule_table(cfg: TrainConfig, total: int | None = None) -> pd.DataFrame:
    """Every schedule at every step: columns step, frac, lr, batch_size, tokens (cumulative), mtp_lambda, gamma."""
    total = total or cfg.steps
    rows, tokens = [], 0
    for step in range(total):
        bs = batch_size_at(step, total, cfg)
        tokens += bs * cfg.seq_len
        rows.append(
            {
                "step": step,
                "frac": step / total,
                "lr": lr_at(step, total, cfg),
                "batch_size": bs,
                "tokens": tokens,
                "mtp_lambda": mtp_lambda_at(step, total, cfg),
                "gamma": bias_speed_at(step, total, cfg),
            }
        )
    return pd.DataFrame(rows)
