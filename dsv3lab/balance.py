"""Load balancing for DeepSeekMoE (DeepSeek-V3 §2.1.2, §4.5).

The balance losses (Eq. 17–20): for the experts chosen by each token,

    f_i = N_r / (K_r · T) · Σ_t 1[expert i ∈ top-K_r of token t]      (the fraction of load, 1 when balanced)
    P_i = 1/T · Σ_t s'_{i,t},  s'_{i,t} = s_{i,t} / Σ_j s_{j,t}         (the mean normalised affinity)
    L_Bal = α · Σ_i f_i · P_i

The *sequence-wise* loss (V3's complementary loss, α = 1e-4) computes f and P over each sequence's T tokens and
averages over sequences; the *conventional expert-level* loss (V2) computes them over all tokens of the batch.
f carries no gradient; the loss pushes the affinities of overloaded experts down through P.

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
