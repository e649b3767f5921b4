"""The training loop: AdamW, gradient accumulation, the paper's schedules, the bias update, metrics, checkpoints.

One optimizer step (DeepSeek-V3 §4.2):

    batch of B(step) sequences  ─ split into micro-batches ─►  forward (optional bf16 autocast) ─► total loss
        total = main + λ(step)/D · Σ_k mtp_k + α-weighted balance losses      (scaled by the micro-batch's share)
    backward per micro-batch  ─►  clip the global grad norm to 1.0  ─►  AdamW(β 0.9/0.95, wd 0.1) at lr(step)
    ─►  bias update from the step's counts, γ(step)  (once per optimizer step, never per micro-batch)
    ─►  metrics row  ─►  validation per domain (every ``eval_every``)  ─►  checkpoint (atomic)

Weight decay applies to matrices (attention, experts, router centroids, MTP projections, output head) and not to
RMSNorm gains or the embedding table; the selection bias is a buffer, so the optimizer never sees it.

A non-finite loss or gradient norm stops the run before the optimizer step with :class:`TrainingDiverged`, naming
the step; the last checkpoint on disk is left as it was.

Notebooks: 04_load_balancing, 05_mtp, 06_pretraining.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..balance import max_violation_per_sequence, update_selection_bias
from ..config import ModelConfig
from ..data import DataConfig, Tokenizer, make_datasets
from ..files import RunLock, atomic_folder, atomic_write_json, check_replaceable, read_json
from ..fp8.optim import AdamW
from ..model import DeepSeekV3, build_model
from ..model.transformer import IGNORE_INDEX, load_state_dict_strict
from ..utils import versions
from .checkpoint import (
    RUN_FILE,
    check_config,
    is_sharded_checkpoint,
    latest_checkpoint,
    load_optimizer_state,
    load_sharded_checkpoint,
    model_differences,
    read_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from .compile import compile_model
from .config import TrainConfig, config_differences
from .metrics import RunMetrics, evaluate, step_load_metrics
from .schedules import batch_size_at, bias_speed_at, lr_at, mtp_lambda_at
from .sft import make_sft_data
from .stages import Parent, check_same_parent, load_parent

LOCK_FILE = ".lock"  # dsv3lab.files.RunLock: one process per run folder


def is_run_folder(path: Path) -> bool:
    """A folder written by :func:`train` (it holds ``run.json``)."""
    return (Path(path) / RUN_FILE).is_file()


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stopped; the last good checkpoint is intact."""


@dataclass
class RunResult:
    """A trained (or loaded) run: the model, its configs, and every measurement as DataFrames."""

    model: DeepSeekV3
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    metrics: pd.DataFrame  # one row per optimizer step
    val: pd.DataFrame  # one row per evaluation and domain
    expert_load: pd.DataFrame  # relative load per evaluation, domain, layer, expert
    loads: dict[str, np.ndarray] = field(default_factory=dict)  # counts / bias [steps, layers, experts]
    tokenizer: Any = None
    out: Path | None = None

    def final_val(self) -> pd.DataFrame:
        """The last evaluation's rows, indexed by domain."""
        if self.val.empty:
            return self.val
        return self.val[self.val.step == self.val.step.max()].set_index("domain")


# ---------------------------------------------------------------------- data
def make_data(cfg: TrainConfig, model_cfg: ModelConfig):
    """The data of this run: the multi-domain corpus of :mod:`dsv3lab.data` (tokenizer vocabulary = the model's), or
    for ``stage="sft"`` the worked math solutions of :mod:`dsv3lab.train.sft`."""
    if cfg.stage == "sft":
        return make_sft_data(cfg, model_cfg)
    kwargs: dict[str, Any] = dict(
        corpus=cfg.corpus,
        vocab_size=model_cfg.vocab_size,
        seq_len=cfg.seq_len,
        fim_rate=cfg.fim_rate,
        seed=cfg.data_seed,
        val_seqs_per_domain=cfg.val_seqs_per_domain,
    )
    if cfg.max_chars_per_domain:
        kwargs["max_chars_per_domain"] = cfg.max_chars_per_domain
    return make_datasets(DataConfig(**kwargs))


def _check_data(data, cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    vocab = data.tokenizer.vocab_size
    if vocab > model_cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {vocab} tokens but the model's vocab_size is {model_cfg.vocab_size}; "
            "set vocab_size >= the tokenizer's"
        )
    tokens, targets = data.batch(0, 1)
    if tokens.shape[1] != cfg.seq_len:
        raise ValueError(f"the data yields sequences of {tokens.shape[1]} tokens but seq_len={cfg.seq_len}")


# ---------------------------------------------------------------------- the optimizer
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay every matrix except the embedding table; no decay on RMSNorm gains (vectors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not name.startswith("embed.") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with FP32 moments (``torch.optim.AdamW``), or with BF16 moments and FP32 master weights when
    ``adam_moments="bf16"`` (§3.3.3, :class:`dsv3lab.fp8.optim.AdamW`)."""
    groups, betas = param_groups(model, cfg.weight_decay), (cfg.beta1, cfg.beta2)
    if cfg.adam_moments == "bf16":
        return AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps, moment_dtype=torch.bfloat16)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps, foreach=False)


# ---------------------------------------------------------------------- the run folder
def prepare_run_dir(
    out: Path, cfg: TrainConfig, model_cfg: ModelConfig, resume: bool, overwrite: bool, parent: Parent | None = None
) -> None:
    """Create ``out`` for this run, or check that it holds this run (``resume``), or replace it (``overwrite``).

    ``parent``: the checkpoint a stage starts from (recorded in ``run.json``; a resumed stage must find the same)."""
    run_file = out / RUN_FILE
    if out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
        if not run_file.exists():
            raise FileExistsError(
                f"{out} is not empty and holds no dsv3lab run ({RUN_FILE} is missing); choose another --out folder"
            )
        saved = read_json(run_file)
        if overwrite:
            check_replaceable(out, is_run_folder)
            for p in out.iterdir():  # everything but the lock this process holds
                if p.name != LOCK_FILE:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        else:
            diffs = [f"train.{d}" for d in config_differences(saved.get("train_config", {}), cfg.identity())]
            diffs += [f"model.{d}" for d in model_differences(saved.get("model_config", {}), model_cfg.to_dict())]
            if not resume:
                what = ("a different run (" + "; ".join(diffs) + ")") if diffs else "this run already"
                raise FileExistsError(f"{out} holds {what}; pass --resume to continue it or --overwrite to replace it")
            if diffs:
                raise ValueError(
                    f"cannot resume {out}: it was started with another configuration; mismatched "
                    "fields (saved -> now): " + "; ".join(diffs) + f". To continue its weights with new settings, "
                    f"start a new stage: --from {out} --out NEW_FOLDER (dsv3lab.train.stages)"
                )
            if parent is not None:
                check_same_parent(saved.get("parent"), parent, out)
            return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        out / RUN_FILE,
        {
            "train_config": cfg.identity(),
            "model_config": model_cfg.to_dict(),
            "environment": {k: getattr(cfg, k) for k in ("out", "device", "fused_loss", "compile")},
            "versions": versions(),
            **({"parent": parent.record()} if parent is not None else {}),
        },
    )


# ---------------------------------------------------------------------- resuming
def resume_run(
    out: Path, cfg: TrainConfig, model_cfg: ModelConfig, model: DeepSeekV3, optimizer: torch.optim.Optimizer
) -> tuple[int, int, RunMetrics]:
    """Load the latest checkpoint of ``out`` into ``model`` and ``optimizer`` and restore the RNG states.

    Returns (completed steps, tokens seen, the metrics up to that step). Without a checkpoint: (0, 0, empty)."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return 0, 0, RunMetrics()
    if is_sharded_checkpoint(ckpt):  # written on several processes: read at this layout, one process
        state = load_sharded_checkpoint(ckpt, model, optimizer)
        check_config(state, cfg.identity(), model_cfg.to_dict(), where=str(ckpt))
    else:
        weights, opt_tensors, state = read_checkpoint(ckpt)
        check_config(state, cfg.identity(), model_cfg.to_dict(), where=str(ckpt))
        load_state_dict_strict(model, weights, where=str(ckpt))
        load_optimizer_state(optimizer, opt_tensors, state)
        set_rng_state(state["rng"], opt_tensors.get("rng.torch"))
    metrics = RunMetrics.load(out)
    metrics.truncate(state["step"])
    return state["step"], state["data"]["tokens_seen"], metrics


# ---------------------------------------------------------------------- one optimizer step
@dataclass
class StepMeasures:
    """What one optimizer step measured, on the host (one transfer per step)."""

    losses: dict[str, float]  # main, mtp_k, aux, total: the batch means
    correct: int  # tokens whose argmax equals the target
    n_tok: int  # tokens with a target
    seq_vio: float  # Σ over sequences of the per-sequence MaxVio, averaged over the main MoE layers
    grad_norm: float  # before clipping
    counts: torch.Tensor  # [MoE layers, E] tokens per expert of the whole step (int64, CPU)


def _micro_batches(tokens: torch.Tensor, targets: torch.Tensor, micro: int):
    for start in range(0, tokens.shape[0], micro):
        yield tokens[start : start + micro], targets[start : start + micro]


def optimizer_step(
    model: DeepSeekV3,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    cfg: TrainConfig,
    *,
    mtp_lambda: float,
    gamma: float,
    step: int,
    on_diverged: Callable[[int, str, float], str],
    forward: Callable | None = None,
) -> StepMeasures:
    """One optimizer step on a batch [B, T] (DeepSeek-V3 §4.2): micro-batches (each loss scaled by its share of the
    batch) → clip → AdamW → the bias update from the step's counts, once (never per micro-batch).

    The batch's ids are checked once, on the host, before they move to the device; inside the step nothing is read
    back until every micro-batch has run, and then everything is read in one transfer. A non-finite loss or gradient
    norm raises :class:`TrainingDiverged` (message from ``on_diverged``) before the optimizer touches the weights.

    ``forward``: what runs the model's forward (default ``model``; the trainer passes the compiled model when
    ``cfg.compile``). ``cfg.fused_loss`` selects the fused head + cross-entropy (the accuracy then comes from the
    model's ``last_predictions``).
    """
    device = next(model.parameters()).device
    model.check_tokens(tokens, 0, targets)  # on the host: no device synchronisation
    tokens, targets = tokens.to(device), targets.to(device)
    autocast = torch.bfloat16 if cfg.dtype == "bf16" else None
    main_moes = model.moe_layers(include_mtp=False)
    n_experts = model.cfg.n_routed_experts
    bs = tokens.shape[0]
    sums: dict[str, torch.Tensor] = {}
    correct = n_tok = seq_vio = torch.zeros((), device=device)
    for tok, tgt in _micro_batches(tokens, targets, cfg.micro_batch_size):
        share = tok.shape[0] / bs
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            # λ as a tensor: a Python float would be a constant of a compiled graph, recompiled when λ switches
            lam = torch.tensor(mtp_lambda, dtype=torch.float32, device=device) if cfg.compile else mtp_lambda
            logits, losses = (forward or model)(tok, tgt, mtp_lambda=lam, check=False, fused_loss=cfg.fused_loss)
        (losses["total"] * share).backward()
        with torch.no_grad():
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() * share
            mask = tgt != IGNORE_INDEX
            pred = model.last_predictions if logits is None else logits.argmax(-1)  # [b, s]
            correct = correct + ((pred == tgt) & mask).sum()
            n_tok = n_tok + mask.sum()
            if main_moes:
                per_layer = [max_violation_per_sequence(m.last_indices, n_experts) for m in main_moes]
                seq_vio = seq_vio + torch.stack(per_layer).mean() * tok.shape[0]
    extra = {"correct": correct, "n_tok": n_tok, "seq_vio": seq_vio}
    host, grad, counts = apply_gradients(model, optimizer, cfg, {**sums, **extra}, gamma, step, on_diverged)
    losses = {name: host[name] for name in sums}
    n_correct, n_valid, vio = (host[k] for k in extra)
    return StepMeasures(losses, int(n_correct), int(n_valid), vio, grad, counts)


def begin_step(
    step: int, cfg: TrainConfig, optimizer: torch.optim.Optimizer, data
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The schedule at ``step`` (its learning rate set on ``optimizer``) and the step's batch of the data stream."""
    sched = schedule_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = sched["lr"]
    tokens, targets = data.batch(step, sched["batch_size"])
    return sched, tokens, targets


def record_step(metrics, row: dict, measures: StepMeasures, moes: list, n_experts: int) -> None:
    """Append one optimizer step to ``metrics``: its row and, for the MoE layers in ``moes`` (empty: loads not
    logged), the expert counts of the step and the selection biases after it ([layers, experts] each)."""
    metrics.rows.append(row)
    if moes:
        metrics.counts.append(measures.counts.numpy().astype(np.int32))
        zeros = torch.zeros(n_experts)
        metrics.bias.append(
            np.stack([(m.gate.bias if m.gate.bias is not None else zeros).float().cpu().numpy() for m in moes])
        )


def apply_gradients(
    model: DeepSeekV3,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    values: dict[str, torch.Tensor],
    gamma: float,
    step: int,
    on_diverged: Callable[[int, str, float], str],
) -> tuple[dict[str, float], float, torch.Tensor]:
    """The end of every optimizer step, once the gradients are accumulated: clip the global norm → read ``values``
    and the norm in one device → host transfer → refuse a non-finite ``values["total"]`` or norm
    (:class:`TrainingDiverged`) → AdamW → the bias update from the step's counts (γ).

    Returns (``values`` on the host, the gradient norm before clipping, the step's expert counts)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    names = list(values)
    host = torch.stack([values[n].float() for n in names] + [grad_norm.float()])
    host = host.double().cpu().tolist()  # the step's one device -> host transfer
    out = dict(zip(names, host[:-1]))
    grad = host[-1]
    if not math.isfinite(out["total"]):
        raise TrainingDiverged(on_diverged(step, "loss", out["total"]))
    if not math.isfinite(grad):
        raise TrainingDiverged(on_diverged(step, "gradient norm", grad))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    counts = update_selection_bias(model.moe_layers(), gamma, cfg.bias_update_rule)  # once per optimizer step
    return out, grad, counts


# ---------------------------------------------------------------------- the metrics row
def metrics_row(
    step: int,
    schedule: dict[str, float],
    m: StepMeasures,
    tokens: int,
    tokens_seen: int,
    elapsed: float,
    model: DeepSeekV3,
) -> dict[str, float]:
    """One row of ``metrics.csv``: schedules, losses, accuracy, gradient norm, speed, load balance, bias size."""
    moes = model.moe_layers()
    n_main = len(model.moe_layers(include_mtp=False))
    row = {
        "step": step,
        "lr": schedule["lr"],
        "batch_size": schedule["batch_size"],
        "tokens": tokens,
        "tokens_seen": tokens_seen,
        "loss_main": m.losses["main"],
    }
    for k in range(1, model.cfg.n_mtp + 1):
        if f"mtp_{k}" in m.losses:
            row[f"loss_mtp_{k}"] = m.losses[f"mtp_{k}"]
    biases = [moe.gate.bias for moe in moes if moe.gate.bias is not None]
    row.update(
        {
            "loss_aux": m.losses["aux"],
            "loss_total": m.losses["total"],
            "acc_main": m.correct / max(m.n_tok, 1),
            "grad_norm": m.grad_norm,
            "tokens_per_s": tokens / elapsed,
            "maxvio_batch": step_load_metrics(m.counts, n_main),
            "maxvio_seq": m.seq_vio / schedule["batch_size"] if n_main else float("nan"),
            "mtp_lambda": schedule["mtp_lambda"],
            "gamma": schedule["gamma"],
            "bias_abs_mean": float(torch.stack([b.abs().mean() for b in biases]).mean()) if biases else 0.0,
            "time_s": elapsed,
        }
    )
    return row


def save_run_checkpoint(
    out: Path | None,
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    steps_done: int,
    tokens_seen: int,
    schedules: dict[str, float],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    metrics: RunMetrics,
) -> None:
    """The metrics so far, then checkpoint ``steps_done`` (atomic) with what resuming needs: the configs, the data
    position and the schedule values. Nothing without a run folder. Pre-training, SFT and GRPO all save through
    here."""
    if out is None:
        return
    metrics.save(out)
    state = {
        "train_config": cfg.identity(),
        "model_config": model_cfg.to_dict(),
        "data": {"next_step": steps_done, "tokens_seen": tokens_seen, "seed": cfg.data_seed},
        "schedules": schedules,
    }
    save_checkpoint(out, steps_done, model, optimizer, state, keep=cfg.keep_checkpoints)


def schedule_at(step: int, cfg: TrainConfig) -> dict[str, float]:
    """The paper's schedules at ``step``: learning rate, batch size, MTP λ and bias speed γ."""
    return {
        "lr": lr_at(step, cfg.steps, cfg),
        "batch_size": batch_size_at(step, cfg.steps, cfg),
        "mtp_lambda": mtp_lambda_at(step, cfg.steps, cfg),
        "gamma": bias_speed_at(step, cfg.steps, cfg),
    }


# ---------------------------------------------------------------------- opening a run (shared by every stage)
def open_run_dir(
    cfg: TrainConfig, model_cfg: ModelConfig, resume: bool, overwrite: bool
) -> tuple[Path | None, Parent | None]:
    """The run folder (prepared: created, checked for resuming, or replaced) and, for a stage that does not resume
    from a checkpoint of its own, its parent (weights checked against ``model_cfg``)."""
    out = Path(cfg.out) if cfg.out else None
    if out is None and resume:
        raise ValueError("resume needs a run folder (TrainConfig.out / --out)")
    parent = None  # a stage starts from its parent's weights, unless it resumes from a checkpoint of its own
    if cfg.init_from and not (resume and out is not None and latest_checkpoint(out) is not None):
        parent = load_parent(cfg.init_from, model_cfg)
    if out is not None:
        prepare_run_dir(out, cfg, model_cfg, resume, overwrite, parent)
    return out, parent


def save_tokenizer(out: Path | None, tokenizer) -> None:
    """``out/tokenizer`` (atomically, once), when the run has a folder and the tokenizer can save itself."""
    if out is not None and hasattr(tokenizer, "save") and not (out / "tokenizer").exists():
        with atomic_folder(out / "tokenizer") as tmp:
            tokenizer.save(tmp)


def build_run_model(
    cfg: TrainConfig, model_cfg: ModelConfig, out: Path | None, parent: Parent | None, resume: bool
) -> tuple[DeepSeekV3, torch.optim.Optimizer, int, int, RunMetrics]:
    """The model (fresh, or the parent's weights), its optimizer, and — when resuming — the state of the latest
    checkpoint. Returns (model, optimizer, completed steps, tokens seen, metrics so far)."""
    model = build_model(model_cfg, device=torch.device(cfg.device), seed=cfg.seed)
    if parent is not None:
        load_state_dict_strict(model, parent.weights, where=str(parent.checkpoint))
    model.train()
    optimizer = make_optimizer(model, cfg)
    start, tokens_seen, metrics = 0, 0, RunMetrics()
    if out is not None and resume:
        start, tokens_seen, metrics = resume_run(out, cfg, model_cfg, model, optimizer)
    return model, optimizer, start, tokens_seen, metrics


# ---------------------------------------------------------------------- the loop
def train(
    cfg: TrainConfig,
    data=None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[dict, DeepSeekV3], None] | None = None,
) -> RunResult:
    """Run ``cfg`` and return the :class:`RunResult`.

    ``data``: an object with ``batch(step, batch_size) -> (tokens, targets)``, ``val`` (domain -> [n, T+1]) and
    ``tokenizer`` (default: :func:`make_data`). ``resume`` continues the run in ``cfg.out`` from its latest checkpoint
    (identical loss trajectory); ``overwrite`` replaces whatever run is there. ``on_step(row, model)`` is called after
    every optimizer step with the metrics row (live plots, tests).
    """
    with run_lock(cfg):  # one process per run folder
        return _train(cfg, data, resume, overwrite, on_step)


def run_lock(cfg: TrainConfig):
    """The run folder's lock (:class:`dsv3lab.files.RunLock`) for the lifetime of a run, or nothing without a folder."""
    return RunLock(cfg.out) if cfg.out else contextlib.nullcontext()


def _train(cfg: TrainConfig, data, resume: bool, overwrite: bool, on_step) -> RunResult:
    model_cfg = cfg.model_config()
    if cfg.stage == "grpo":
        raise ValueError("stage='grpo' trains with dsv3lab.train.grpo.train_grpo (dsv3lab train --stage grpo)")
    out, parent = open_run_dir(cfg, model_cfg, resume, overwrite)
    if data is None:
        data = make_data(cfg, model_cfg)
    _check_data(data, cfg, model_cfg)
    save_tokenizer(out, data.tokenizer)
    model, optimizer, start, tokens_seen, metrics = build_run_model(cfg, model_cfg, out, parent, resume)
    autocast = torch.bfloat16 if cfg.dtype == "bf16" else None
    moes = model.moe_layers()
    # falls back to eager with a warning; each new batch size of the ramp compiles once more (the fused loss's chunk
    # loop specialises on the number of tokens), which the on-disk cache makes cheap for later runs
    forward = compile_model(model) if cfg.compile else model

    def checkpoint(steps_done: int) -> None:
        schedules = schedule_at(min(steps_done, cfg.steps - 1), cfg)
        save_run_checkpoint(out, cfg, model_cfg, steps_done, tokens_seen, schedules, model, optimizer, metrics)

    def diverged(step: int, what: str, value: float) -> str:
        return _diverged_message(step, what, value, out)

    bar = tqdm(
        total=cfg.steps, initial=start, disable=not cfg.progress, desc=f"train {cfg.balance}", dynamic_ncols=True
    )
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            sched, tokens, targets = begin_step(step, cfg, optimizer, data)
            measures = optimizer_step(
                model,
                optimizer,
                tokens,
                targets,
                cfg,
                mtp_lambda=sched["mtp_lambda"],
                gamma=sched["gamma"],
                step=step,
                on_diverged=diverged,
                forward=forward,
            )
            tokens_seen += int(tokens.numel())
            row = metrics_row(step, sched, measures, int(tokens.numel()), tokens_seen, time.perf_counter() - t0, model)
            record_step(metrics, row, measures, moes if cfg.log_loads else [], model_cfg.n_routed_experts)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss_main']:.3f}", vio=f"{row['maxvio_batch']:.2f}", refresh=False)
            done = step + 1
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                val_rows, load_rows = evaluate(
                    model, data.val, batch_size=cfg.micro_batch_size, step=done, autocast_dtype=autocast
                )
                metrics.val_rows += val_rows
                metrics.load_rows += load_rows
            if on_step is not None:
                on_step(row, model)
            if done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                checkpoint(done)
    except TrainingDiverged:
        if out is not None:  # keep what was measured up to the failure; the checkpoint stays untouched
            metrics.save(out)
        raise
    finally:
        bar.close()
    model.eval()
    tokenizer = getattr(data, "tokenizer", None)
    return RunResult(
        model, model_cfg, cfg, metrics.frame, metrics.val, metrics.expert_load, metrics.loads(), tokenizer, out
    )


def _diverged_message(step: int, what: str, value: float, out: Path | None) -> str:
    ckpt = latest_checkpoint(out) if out is not None else None
    keep = f"the last good checkpoint is {ckpt} (intact)" if ckpt else "no checkpoint had been written yet"
    return f"non-finite {what} ({value}) at step {step}: training stopped; {keep}"


# ---------------------------------------------------------------------- loading a finished run
def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> RunResult:
    """The model (latest checkpoint), tokenizer and measurements of a run folder written by :func:`train`."""
    run_dir = Path(run_dir)
    run_file = run_dir / RUN_FILE
    if not run_file.exists():
        raise FileNotFoundError(f"{run_dir} holds no dsv3lab run ({RUN_FILE} is missing)")
    saved = read_json(run_file, "a dsv3lab run description")
    env = {k: v for k, v in saved.get("environment", {}).items() if k in ("out", "device")}
    cfg = TrainConfig.from_dict({**saved["train_config"], **env, "out": str(run_dir), "progress": False})
    model_cfg = ModelConfig.from_dict(saved["model_config"])
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint yet (no '{'latest'}' pointer)")
    model = build_model(model_cfg, device=device)
    if is_sharded_checkpoint(ckpt):  # a run on several processes: its shards read into one model
        state = load_sharded_checkpoint(ckpt, model)
        check_config(state, cfg.identity(), model_cfg.to_dict(), where=str(ckpt))
    else:
        weights, _, state = read_checkpoint(ckpt)
        check_config(state, cfg.identity(), model_cfg.to_dict(), where=str(ckpt))
        load_state_dict_strict(model, weights, where=str(ckpt))
    model.eval()
    metrics = RunMetrics.load(run_dir)
    metrics.truncate(state["step"])
    tokenizer = Tokenizer.load(run_dir / "tokenizer") if (run_dir / "tokenizer").exists() else None
    return RunResult(
        model, model_cfg, cfg, metrics.frame, metrics.val, metrics.expert_load, metrics.loads(), tokenizer, run_dir
    )
