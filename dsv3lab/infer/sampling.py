"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p (nucleus).

Shared by plain decoding (``generation.py``) and MTP speculative decoding (``speculative.py``).

Notebook: 10_inference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TokenCallback = Callable[[int, int], None]  # (sequence index, token id), called as each new token is chosen


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A seeded generator on ``device`` for reproducible sampling (None: torch's global RNG)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def next_token_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """softmax(logits / T) [b, V] with everything outside the top-k and the top-p nucleus set to 0, renormalised."""
    if temperature <= 0:
        raise ValueError("next_token_probs needs temperature > 0 (temperature 0 is greedy: use argmax)")
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p  # probability of the more likely tokens
        drop = mass_before >= top_p  # the nucleus already reached top_p without this token (the first always stays)
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of logits [b, V]: argmax when temperature is 0, else a draw from :func:`next_token_probs`."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
