"""Load balancing for DeepSeekMoE (DeepSeek-V3 §2.1.2, §4.5).

The balance losses (Eq. 17–20): for the experts chosen by each token,

    f_i = N_r / (K_r · T) · Σ_t 1[expert i ∈ top-K_r of token t]      (the fraction of load, 1 when balanced)
    P_i = 1/T · Σ_t s'_{i,t},  s'_{i,t} = s_{i,t} / Σ_j s_{j,t}         (the mean normalised affinity)
    L_Bal = α · Σ_i f_i · P_i

The *sequence-wise* loss (V3's complementary loss, α = 1e-4) computes f and P over each sequence's T tokens and
averages over sequences; the *conventional expert-level* loss (V2) computes them over all tokens of the batch.
f carries no gradient; the loss pushes the affinities of overloaded experts down through P.

The *auxiliary-loss-free* strategy (V3) needs no loss: each expert's selection bias b_i (``Gate.bias``, a buffer used
only to choose the top-K) moves by ±γ after every optimizer step, against that step's load
(:func:`update_selection_bias`); :func:`simulate_bias_update` runs the same rule on a fixed router's affinities, without
a model.
The statistics at the end (MaxVio, relative load) are the measurements of §4.5 and Fig. 9.

Notebook: 04_load_balancing.
"""

from __future__ import annotations

import torch


def balance_loss(scores: torch.Tensor, indices: torch.Tensor, per_sequence: bool) -> torch.Tensor:
    """Σ_i f_i P_i (without α), averaged over sequences when ``per_sequence``.

    scores: [b, s, E] router affinities (sigmoid or softmax, unbiased); indices: [b, s, K] chosen experts.
    """
    b, s, n_experts = scores.shape
    k = indices.shape[-1]
    probs = scores / scores.sum(dim=-1, keepdim=True)  # s' [b, s, E]
    if not per_sequence:  # one "sequence" holding every token of the batch
        probs, indices = probs.reshape(1, b * s, n_experts), indices.reshape(1, b * s, k)
    n_seq, t = probs.shape[:2]
    ones = torch.ones(n_seq, t * k, device=scores.device, dtype=probs.dtype)
    counts = torch.zeros(n_seq, n_experts, device=scores.device, dtype=probs.dtype)
    counts.scatter_add_(1, indices.reshape(n_seq, t * k), ones)  # [n_seq, E] tokens per expert
    f = counts * n_experts / (k * t)  # [n_seq, E]
    p = probs.mean(dim=1)  # [n_seq, E]
    return (f * p).sum(dim=-1).mean()


# ---------------------------------------------------------------------- auxiliary-loss-free bias update (§2.1.2)
BIAS_RULES = ("sign", "sign_centered")
PAPER_GAMMA = 1e-3  # γ of §4.2 for the first 14.3T tokens (0 for the last 500B)


@torch.no_grad()
def bias_delta(counts: torch.Tensor, gamma: float, rule: str = "sign") -> torch.Tensor:
    """The change of the selection bias b for one optimizer step, from that step's tokens per expert ``counts`` [E].

    ``sign`` (the paper, Megatron): b_i -= γ when expert i is over the mean load, += γ when under (0 when exactly at
    the mean). ``sign_centered`` (torchtitan) subtracts the mean of that delta, so Σ_i b_i stays constant.
    """
    if rule not in BIAS_RULES:
        raise ValueError(f"bias update rule must be one of {BIAS_RULES}, got {rule!r}")
    load = counts.double()
    delta = gamma * torch.sign(load.mean() - load)  # +γ under-loaded, -γ over-loaded
    if rule == "sign_centered":
        delta = delta - delta.mean()
    return delta.float()


@torch.no_grad()
def update_selection_bias(moes: list, gamma: float, rule: str = "sign", group=None) -> torch.Tensor:
    """Once per optimizer step (after gradient accumulation): read and reset every MoE's ``tokens_per_expert``, and
    move its selection bias by :func:`bias_delta` (γ = 0 only reads and resets).

    The counts are summed over the ranks of ``group`` (default: all ranks) first when ``torch.distributed`` is
    initialised, so every rank applies the same update. Each rank counts the choices of its *own* tokens, so the
    default is right for data parallelism, expert parallelism (``dsv3lab.parallel.ExpertParallelMoE``) and DP × EP.
    Under pipeline parallelism each rank holds other layers: pass the group of ranks holding these same layers
    (data-parallel replicas, DualPipe's mirror copies), with ``moes`` in the same order on each of them. Returns the
    step's counts [n_layers, E] (int64), the input of the load metrics.
    """
    if not moes:
        return torch.zeros(0, 0, dtype=torch.int64)
    counts = torch.stack([moe.tokens_per_expert for moe in moes])  # [L, E]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts, group=group)
    for moe, c in zip(moes, counts):
        if gamma > 0:
            if moe.gate.bias is None:
                raise ValueError("the auxiliary-loss-free bias update needs gate_bias=True in the ModelConfig")
            moe.gate.bias += bias_delta(c, gamma, rule).to(moe.gate.bias.device)
        moe.tokens_per_expert.zero_()
    return counts.cpu()


@torch.no_grad()
def simulate_bias_update(
    scores: torch.Tensor, k: int, gamma: float, rule: str = "sign", bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bias update of a fixed router, without a model: what :func:`update_selection_bias` does to one MoE layer
    whose gate gives the affinities ``scores`` [steps, T, E] (one step's T tokens per row; sigmoid or softmax,
    unbiased). Each step chooses the top-``k`` of s + b (Eq. 16, no expert groups), counts the tokens per expert and
    moves b by :func:`bias_delta`. Starts from ``bias`` [E] (default zeros). Returns the counts of every step
    [steps, E] (int64) and the bias after every step [steps, E]. Notebook 04's γ explorer runs it."""
    if scores.dim() != 3:
        raise ValueError(f"scores must be [steps, tokens, experts], got shape {tuple(scores.shape)}")
    n_experts = scores.shape[-1]
    if not 1 <= k <= n_experts:
        raise ValueError(f"k must be in [1, {n_experts}] (the number of experts), got {k}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if rule not in BIAS_RULES:
        raise ValueError(f"bias update rule must be one of {BIAS_RULES}, got {rule!r}")
    b = torch.zeros(n_experts) if bias is None else bias.detach().float().clone()
    all_counts, all_bias = [], []
    for s in scores.float():  # [T, E]
        idx = (s + b).topk(k, dim=-1).indices  # the bias only chooses
        counts = torch.bincount(idx.flatten(), minlength=n_experts)  # [E]
        b = b + bias_delta(counts, gamma, rule)
        all_counts.append(counts)
        all_bias.append(b)
    return torch.stack(all_counts), torch.stack(all_bias)


# ---------------------------------------------------------------------- load statistics
def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """MaxVio = max_i load_i / mean_i load_i - 1 over the last dim (0 = perfectly balanced). counts [..., E]."""
    load = counts.double()
    return load.amax(dim=-1) / load.mean(dim=-1).clamp_min(1e-12) - 1.0


def sequence_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens per expert for each sequence: indices [b, s, K] -> counts [b, E]."""
    b = indices.shape[0]
    flat = indices.reshape(b, -1)
    counts = torch.zeros(b, n_experts, dtype=torch.int64, device=indices.device)
    return counts.scatter_add_(1, flat, torch.ones_like(flat))


def max_violation_per_sequence(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """MaxVio of each sequence's own load, averaged over sequences. indices [b, s, K] -> scalar."""
    return max_violation(sequence_counts(indices, n_experts)).mean()


def relative_load(counts: torch.Tensor, k: int) -> torch.Tensor:
    """Actual / balanced load (Fig. 9): counts [..., E] divided by (tokens · K / E); 1 everywhere when balanced."""
    load = counts.double()
    n_experts = counts.shape[-1]
    tokens = load.sum(dim=-1, keepdim=True) / k
    return load / (tokens * k / n_experts).clamp_min(1e-12)
