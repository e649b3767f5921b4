"""Group Relative Policy Optimization with rule-based rewards (DeepSeek-V3 §5.2.2; DeepSeekMath §4.1).

GRPO needs no value model: for each question q it samples a group of G outputs {o_1 … o_G} from the old policy,
scores them (here with the rule-based rewards of :mod:`dsv3lab.train.rewards`), and uses the group itself as the
baseline. Per output i and token t, with ratio ρ_i,t = π_θ(o_i,t | q, o_i,<t) / π_θold(o_i,t | q, o_i,<t)::

    J(θ) = E[ 1/G Σ_i 1/|o_i| Σ_t { min(ρ_i,t A_i, clip(ρ_i,t, 1 - ε, 1 + ε) A_i) - β D_KL(π_θ || π_ref) } ]   (26)
    D_KL(π_θ || π_ref) = π_ref / π_θ - log(π_ref / π_θ) - 1          (per token; an unbiased, positive estimator)  (27)
    A_i = (r_i - mean(r_1 … r_G)) / std(r_1 … r_G)                                                             (28)

(equation numbers of the DeepSeek-V3 report, which writes the ratio per output; the token-level form and the
1/|o_i| average are DeepSeekMath's, which the report's formula abbreviates). ``std`` is the sample standard deviation
(``torch.std``, n - 1); a group whose rewards are all equal has std 0 and gets A = 0 (it carries no signal). The loss
minimised is -J. π_ref is the policy the stage started from (its parent's weights, kept in ``reference/`` of the run
folder so that a resumed run finds it). With ``grpo_iterations`` μ = 1 (DeepSeekMath's setting) π_old = π_θ at the
single update and ρ = 1: the clip only acts when μ > 1.

One GRPO step::

    batch_size problems ─► G samples each (dsv3lab.infer.generate, temperature, seeded by (seed, step))
    ─► rewards r [P, G] ─► advantages (28) ─► log π_old, log π_ref of the sampled tokens (no gradient)
    ─► μ × { micro-batches: -J (26, 27) backward ─► apply_gradients: clip, AdamW, bias update }   (trainer's pieces)

Everything else is the pre-training trainer's: the run folder, stages (``init_from``), the learning-rate schedule,
checkpoints written atomically, bit-identical resume (the rollouts are seeded by the step), ``TrainingDiverged``.
This module samples with :func:`dsv3lab.infer.generate` — the one generation API — which is why
``dsv3lab.train``'s package does not import it (``dsv3lab.infer`` imports ``dsv3lab.train`` to read run folders):
import ``dsv3lab.train.grpo`` itself.

Notebook: 13_post_training.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data.loader import epoch_permutation, sample_rows
from ..data.math_problems import MathProblem
from ..files import atomic_folder
from ..infer.generation import generate
from ..model import DeepSeekV3, build_model
from ..model.transformer import IGNORE_INDEX, load_state_dict_strict
from .config import TrainConfig
from .rewards import math_reward
from .schedules import bias_speed_at, lr_at
from .sft import EVAL_STREAM, TRAIN_STREAM, problems, run_tokenizer
from .trainer import (
    RunResult,
    TrainingDiverged,
    _diverged_message,
    apply_gradients,
    build_run_model,
    open_run_dir,
    run_lock,
    save_run_checkpoint,
    save_tokenizer,
)

REFERENCE = "reference"  # the run folder's copy of π_ref (model.safetensors)


# ---------------------------------------------------------------------- the formulas
def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Eq. (28): A = (r - mean(r)) / std(r) within each group. rewards [P, G] -> [P, G]; 0 where std(r) = 0."""
    mean = rewards.mean(dim=1, keepdim=True)  # [P, 1]
    std = rewards.std(dim=1, keepdim=True)  # [P, 1], sample std (n - 1)
    return torch.where(std > 0, (rewards - mean) / std.clamp_min(torch.finfo(rewards.dtype).tiny), 0.0)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Eq. (27) per token: π_ref/π_θ - log(π_ref/π_θ) - 1 from log-probabilities (≥ 0, 0 where they agree)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    kl_coef: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-J of Eq. (26) summed over the given outputs (divide by their total count for the mean).

    logp, old_logp, ref_logp, mask: [n, T] (log-probabilities of the sampled tokens; mask 1 on completion tokens);
    advantages: [n]. Returns (Σ_i of -1/|o_i| Σ_t {…}, per-output sums of the statistics: ``kl``, ``clipped``,
    ``ratio`` — each averaged over the output's tokens)."""
    mask = mask.to(logp.dtype)
    n_tok = mask.sum(dim=1).clamp_min(1.0)  # |o_i|
    ratio = torch.exp(logp - old_logp)  # ρ_i,t
    adv = advantages[:, None]  # [n, 1]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    kl = kl_estimate(logp, ref_logp)
    per_token = surrogate - kl_coef * kl  # the integrand of (26)
    objective = (per_token * mask).sum(dim=1) / n_tok  # [n]: 1/|o_i| Σ_t
    with torch.no_grad():
        clipped = ((ratio - ratio.clamp(1 - clip_eps, 1 + clip_eps)).abs() > 0).to(logp.dtype)
        stats = {
            "kl": ((kl * mask).sum(dim=1) / n_tok).sum(),
            "clipped": ((clipped * mask).sum(dim=1) / n_tok).sum(),
            "ratio": ((ratio * mask).sum(dim=1) / n_tok).sum(),
        }
    return -objective.sum(), stats


def token_logprobs(model: DeepSeekV3, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log π(targets[:, t] | tokens[:, ≤ t]) per position, [n, T] float32; 0 where the target is ignored."""
    logits = model.logits(model.hidden(tokens)).float()  # [n, T, V]
    picked = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]  # [n, T]
    return torch.where(targets != IGNORE_INDEX, picked, 0.0)


# ---------------------------------------------------------------------- sampling and scoring
@dataclass
class Rollout:
    """G sampled completions for each of P problems, scored, as training rows (prompt and padding masked)."""

    problems: list[MathProblem]  # P
    tokens: torch.Tensor  # [P·G, L]
    targets: torch.Tensor  # [P·G, L]: the completion's tokens (eos included when the model stopped), else ignored
    completions: list[str]  # P·G decoded completions (eos not included)
    finished: list[bool]  # P·G: stopped by the end-of-sequence token (not the length limit)
    rewards: torch.Tensor  # [P, G] total reward
    correct: torch.Tensor  # [P, G] 0/1
    format: torch.Tensor  # [P, G] 0/1

    @property
    def group_size(self) -> int:
        return self.rewards.shape[1]

    @property
    def mask(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX


def _prompt_ids(tokenizer, problem: MathProblem) -> list[int]:
    return [tokenizer.bos_id, *tokenizer.encode(problem.prompt)]


def rollout(
    model: DeepSeekV3,
    tokenizer,
    batch: Sequence[MathProblem],
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    reward_correct: float = 1.0,
    reward_format: float = 0.5,
) -> Rollout:
    """Sample ``group_size`` completions per problem with :func:`dsv3lab.infer.generate` (seeded), score them, and
    lay them out as rows ``bos prompt completion [eos] pad…`` with only the completion (and eos) as targets."""
    prompts = [_prompt_ids(tokenizer, p) for p in batch for _ in range(group_size)]
    seed = seed if temperature > 0 else None  # greedy decoding draws nothing: generate() refuses a seed there
    out = generate(
        model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, eos_id=tokenizer.eos_id
    )
    finished = [f == "eos" for f in out.finish]
    completions = [tokenizer.decode(ids) for ids in out.ids]
    scores = [
        math_reward(text, batch[i // group_size], done, reward_correct, reward_format)
        for i, (text, done) in enumerate(zip(completions, finished))
    ]
    seqs = [(p, ids + [tokenizer.eos_id] * done) for p, ids, done in zip(prompts, out.ids, finished)]
    length = max(len(p) + len(c) for p, c in seqs) - 1
    tokens = torch.full((len(seqs), length), tokenizer.pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        ids = torch.tensor(p + c)
        tokens[i, : len(ids) - 1] = ids[:-1]
        targets[i, len(p) - 1 : len(ids) - 1] = ids[len(p) :]  # the completion's tokens only
    shape = (len(batch), group_size)
    totals, right, formatted = (
        torch.tensor([getattr(s, k) for s in scores]).view(shape) for k in ("total", "correct", "format")
    )
    return Rollout(list(batch), tokens, targets, completions, finished, totals, right, formatted)


@torch.no_grad()
def math_accuracy(
    model: DeepSeekV3,
    tokenizer,
    batch: Sequence[MathProblem],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per problem: kind, question, answer, the model's completion, ``correct`` and ``format`` (0/1), greedy by
    default (``temperature=0``)."""
    prompts = [_prompt_ids(tokenizer, p) for p in batch]
    seed = seed if temperature > 0 else None  # greedy decoding draws nothing: generate() refuses a seed there
    out = generate(
        model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, eos_id=tokenizer.eos_id
    )
    rows = []
    for p, ids, fin in zip(batch, out.ids, out.finish):
        text = tokenizer.decode(ids)
        r = math_reward(text, p, fin == "eos")
        rows.append(
            {"kind": p.kind, "question": p.question, "answer": p.answer, "completion": text}
            | {"correct": r.correct, "format": r.format}
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------- one GRPO step
def grpo_step(
    policy: DeepSeekV3,
    reference: DeepSeekV3,
    optimizer: torch.optim.Optimizer,
    ro: Rollout,
    cfg: TrainConfig,
    *,
    gamma: float,
    step: int,
    on_diverged: Callable[[int, str, float], str],
) -> dict[str, float]:
    """μ = ``grpo_iterations`` policy updates on one rollout: log π_old and log π_ref once (no gradient), then per
    update the micro-batches' -J (26) backward and :func:`~dsv3lab.train.trainer.apply_gradients`."""
    device = next(policy.parameters()).device
    policy.check_tokens(ro.tokens, 0, ro.targets)  # on the host, once
    tokens, targets, mask = ro.tokens.to(device), ro.targets.to(device), ro.mask.to(device)
    advantages = group_advantages(ro.rewards).flatten().to(device)  # [P·G]
    n = tokens.shape[0]
    micro = cfg.micro_batch_size
    chunks = [slice(i, min(i + micro, n)) for i in range(0, n, micro)]
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    with torch.no_grad(), torch.autocast(**autocast):
        was_training = policy.training
        policy.eval()  # same function, no expert counts: the bias update sees only the training forwards
        old = torch.cat([token_logprobs(policy, tokens[c], targets[c]) for c in chunks])
        policy.train(was_training)
        ref = torch.cat([token_logprobs(reference, tokens[c], targets[c]) for c in chunks])
    for _ in range(cfg.grpo_iterations):
        total = torch.zeros((), device=device)
        sums = {k: torch.zeros((), device=device) for k in ("kl", "clipped", "ratio")}
        for c in chunks:
            with torch.autocast(**autocast):
                logp = token_logprobs(policy, tokens[c], targets[c])
            loss, stats = grpo_loss(logp, old[c], ref[c], advantages[c], mask[c], cfg.clip_eps, cfg.kl_coef)
            (loss / n).backward()  # the mean over the P·G outputs, accumulated micro-batch by micro-batch
            total = total + loss.detach() / n
            for k, v in stats.items():
                sums[k] = sums[k] + v / n
        host, grad, _ = apply_gradients(policy, optimizer, cfg, {"total": total, **sums}, gamma, step, on_diverged)
    return {
        "loss": host["total"],
        "kl": host["kl"],
        "clip_frac": host["clipped"],
        "ratio": host["ratio"],
        "grad_norm": grad,
    }


# ---------------------------------------------------------------------- the loop
def _prompt_pool(cfg: TrainConfig, tokenizer, max_seq_len: int, stream: int) -> list[MathProblem]:
    """The stream's problems of ``cfg.kinds`` whose prompt leaves room for ``max_new_tokens``."""
    pool = [
        p
        for p in problems(cfg.data_seed + stream, cfg.kinds)
        if len(_prompt_ids(tokenizer, p)) + cfg.max_new_tokens <= max_seq_len
    ]
    if not pool:
        raise ValueError(f"no problem's prompt + max_new_tokens={cfg.max_new_tokens} fits max_seq_len={max_seq_len}")
    return pool


def _save_reference(out: Path, model: DeepSeekV3) -> None:
    with atomic_folder(out / REFERENCE) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors")
        )


def train_grpo(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[dict, DeepSeekV3], None] | None = None,
) -> RunResult:
    """Run GRPO (``cfg.stage == "grpo"``, usually a stage: ``init_from`` an SFT run) and return the
    :class:`~dsv3lab.train.trainer.RunResult`: ``metrics`` has one row per GRPO step (rewards, accuracy and format
    of the samples, KL, clipped share, loss, gradient norm), ``val`` the greedy accuracy on held-out problems at
    every evaluation (``eval_every`` and the last step)."""
    if cfg.stage != "grpo":
        raise ValueError(f"train_grpo runs stage='grpo', got stage={cfg.stage!r}")
    with run_lock(cfg):  # one process per run folder, as pre-training
        return _train_grpo(cfg, resume, overwrite, on_step)


def _train_grpo(cfg: TrainConfig, resume: bool, overwrite: bool, on_step) -> RunResult:
    model_cfg = cfg.model_config()
    out, parent = open_run_dir(cfg, model_cfg, resume, overwrite)
    tokenizer = run_tokenizer(cfg, model_cfg)
    save_tokenizer(out, tokenizer)
    train_pool = _prompt_pool(cfg, tokenizer, model_cfg.max_seq_len, TRAIN_STREAM)
    eval_set = _prompt_pool(cfg, tokenizer, model_cfg.max_seq_len, EVAL_STREAM)[: cfg.eval_problems]

    policy, optimizer, start, tokens_seen, metrics = build_run_model(cfg, model_cfg, out, parent, resume)
    reference = build_model(model_cfg, device=torch.device(cfg.device), seed=cfg.seed)
    if out is not None and (out / REFERENCE).exists():
        load_state_dict_strict(reference, load_file(str(out / REFERENCE / "model.safetensors")), where=str(out))
    elif start == 0:  # π_ref = the policy the stage starts from
        reference.load_state_dict(policy.state_dict())
        if out is not None:
            _save_reference(out, reference)
    else:
        raise FileNotFoundError(f"{out} has checkpoints but no {REFERENCE}/ copy of the reference policy")
    reference.eval().requires_grad_(False)

    def perm(epoch: int) -> np.ndarray:
        return epoch_permutation(len(train_pool), cfg.data_seed, epoch)

    def evaluate_accuracy(done: int) -> None:
        acc = math_accuracy(policy, tokenizer, eval_set, cfg.max_new_tokens)
        metrics.val_rows.append(
            {"step": done, "domain": "math", "accuracy": acc.correct.mean(), "format": acc.format.mean(), "n": len(acc)}
        )

    def checkpoint(done: int) -> None:
        schedules = {"lr": lr_at(min(done, cfg.steps - 1), cfg.steps, cfg)}
        save_run_checkpoint(out, cfg, model_cfg, done, tokens_seen, schedules, policy, optimizer, metrics)

    def diverged(step: int, what: str, value: float) -> str:
        return _diverged_message(step, what, value, out)

    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, desc="grpo", dynamic_ncols=True)
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = [train_pool[i] for i in sample_rows(len(train_pool), step, cfg.batch_size, perm)]
            knobs = ("group_size", "max_new_tokens", "temperature", "reward_correct", "reward_format")
            seed = cfg.seed * 1_000_003 + step
            ro = rollout(policy, tokenizer, batch, seed=seed, **{k: getattr(cfg, k) for k in knobs})
            t_rollout = time.perf_counter() - t0
            measures = grpo_step(
                policy,
                reference,
                optimizer,
                ro,
                cfg,
                gamma=bias_speed_at(step, cfg.steps, cfg),
                step=step,
                on_diverged=diverged,
            )
            n_tok = int(ro.mask.sum())
            tokens_seen += n_tok
            row = {
                "step": step,
                "lr": lr,
                "prompts": len(batch),
                "samples": ro.rewards.numel(),
                "reward": float(ro.rewards.mean()),
                "correct": float(ro.correct.mean()),
                "format": float(ro.format.mean()),
                "reward_std": float(ro.rewards.std(dim=1).mean()),
                "groups_without_signal": float((ro.rewards.std(dim=1) == 0).float().mean()),
                "completion_tokens": n_tok / ro.rewards.numel(),
                **measures,
                "tokens": n_tok,
                "tokens_seen": tokens_seen,
                "rollout_s": t_rollout,
                "time_s": time.perf_counter() - t0,
            }
            metrics.rows.append(row)
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward']:.3f}", correct=f"{row['correct']:.2f}", refresh=False)
            done = step + 1
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                evaluate_accuracy(done)
            if on_step is not None:
                on_step(row, policy)
            if done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                checkpoint(done)
    except TrainingDiverged:
        if out is not None:
            metrics.save(out)
        raise
    finally:
        bar.close()
    policy.eval()
    return RunResult(policy, model_cfg, cfg, metrics.frame, metrics.val, pd.DataFrame(), {}, tokenizer, out)
