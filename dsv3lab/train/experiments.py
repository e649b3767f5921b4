"""Helpers for the experiments behind ``dsv3lab reproduce``: the shared toy-run settings and a run cache.

Runs are the expensive part, so experiments share them: :func:`cached_run` keys a run folder under
``data/cache/runs/`` (git-ignored) by the hash of the full configuration (TrainConfig identity + resolved
ModelConfig + :data:`CACHE_VERSION`). A finished run is loaded, a partial one resumed, a missing one trained. E1
(load balance) trains the four variants; E2 (specialization) reuses them; E3 (MTP) reuses E1's ``aux_free`` runs as
"D = 1" and trains the "D = 0" runs.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

from .config import TrainConfig
from .trainer import RunResult, make_data, train

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RUN_CACHE = REPO_ROOT / "data" / "cache" / "runs"
CACHE_VERSION = 1  # bump when the trainer's numerics change, so that stale runs are not reused


def suite_config(balance: str, seed: int, fast: bool, **changes) -> TrainConfig:
    """The toy run every training experiment shares (one place, so that E1–E3 hit the same cached runs).

    Default: the ``toy`` preset (4 layers, 1 dense + 3 MoE, 16 routed experts top-4 in 4 groups, 1 shared, MTP D=1),
    grouped-GEMM experts, sequences of 256 tokens, 120 optimizer steps ramping 1 → 8 sequences (≈ 0.24M tokens),
    peak lr 2e-3, γ = 5e-3, validation on 16 sequences per domain every 40 steps. ``fast``: 40 steps of up to 4
    sequences of 128 tokens from the small corpus (``DataConfig.small``), 8 validation sequences per domain,
    evaluated at the end only.
    """
    base = dict(
        preset="toy",
        model={"moe_impl": "grouped"},
        balance=balance,
        seed=seed,
        seq_len=256,
        bias_update_speed=5e-3,
        lr=2e-3,
        progress=False,
    )
    if fast:
        base.update(
            steps=40,
            batch_size=4,
            micro_batch_size=4,
            eval_every=0,
            seq_len=128,
            max_chars_per_domain=200_000,
            val_seqs_per_domain=8,
        )
    else:
        base.update(steps=120, batch_size=8, micro_batch_size=8, eval_every=40, val_seqs_per_domain=16)
    model = {**base.pop("model"), **changes.pop("model", {})}
    base.update(changes)
    return TrainConfig(model=model, **base)


def run_key(cfg: TrainConfig) -> str:
    digest = hashlib.sha256(f"{cfg.hash()}-v{CACHE_VERSION}".encode()).hexdigest()[:12]
    return f"{cfg.preset}-{cfg.balance}-s{cfg.seed}-{digest}"


class RunCache:
    """Trained runs keyed by configuration; data sets built once per data configuration."""

    def __init__(self, root: str | Path | None = None, log: Callable[[str], None] = print):
        self.root = Path(root) if root else DEFAULT_RUN_CACHE
        self.log = log
        self._data: dict[tuple, object] = {}

    def data(self, cfg: TrainConfig):
        key = (
            cfg.corpus,
            cfg.seq_len,
            cfg.fim_rate,
            cfg.data_seed,
            cfg.max_chars_per_domain,
            cfg.val_seqs_per_domain,
            cfg.model_config().vocab_size,
        )
        if key not in self._data:
            self._data[key] = make_data(cfg, cfg.model_config())
        return self._data[key]

    def run(self, cfg: TrainConfig) -> RunResult:
        out = self.root / run_key(cfg)
        cfg = cfg.replace(out=str(out))
        done = (out / "latest").exists() and (out / "latest").read_text().strip() == f"ckpt-{cfg.steps:07d}"
        self.log(f"  run {out.name}: {'cached' if done else 'training'} ({cfg.steps} steps)")
        try:
            return train(cfg, self.data(cfg), resume=True)
        except (ValueError, OSError, SafetensorError) as err:  # a corrupt cache entry is rebuilt, never fatal
            warnings.warn(f"the cached run {out} is unreadable ({err}); training it again", stacklevel=2)
            return train(cfg, self.data(cfg), overwrite=True)


def cached_run(cfg: TrainConfig, root: str | Path | None = None, log: Callable[[str], None] = print) -> RunResult:
    """Load, resume or train ``cfg`` in the run cache (see :class:`RunCache`)."""
    return RunCache(root, log).run(cfg)
