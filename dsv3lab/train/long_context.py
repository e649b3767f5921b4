"""Measuring a context extension (DeepSeek-V3 §4.3): loss per position, and the needle-in-a-haystack grid (Fig. 8).

After pre-training at a short context, DeepSeek-V3 extends it with YaRN in two short stages (4K → 32K → 128K) and
checks the result with "Needle In A Haystack" across lengths and depths. At toy size, two measurements say whether an
extension worked:

* **loss per position**: the mean next-token loss at each position of long validation rows. A model that only saw
  positions < T₀ often gets worse beyond T₀ (rotations it never saw); a working extension keeps the curve flat.
* **needle accuracy**: rows of :mod:`dsv3lab.data.needle` at each (length, depth); a row counts as retrieved when the
  model's greedy prediction equals every digit of the pass key (teacher-forced: one forward per row, the query's
  last token and the key's digits predict the next digit).

Both run in eval mode without gradients and without touching the selection bias or the training counters.

Training data for the toy test (:class:`NeedleMixture`): plain packed text at most steps, and at every
``retrieval_every``-th step rows with a needle whose loss counts only the answer. A tiny model trained on text with
the needle's answer as one token in 64 does not learn to retrieve in minutes (measured: the answer loss stays at
ln |alphabet|); a step of its own gives retrieval the weight of a task, as a data mixture does.

Notebook: 12_long_context.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from ..data.needle import NeedleFormat, needle_rows
from ..model import DeepSeekV3
from ..model.transformer import IGNORE_INDEX


def _check_length(model: DeepSeekV3, length: int) -> None:
    if length > model.cfg.max_seq_len:
        raise ValueError(
            f"rows of {length} tokens exceed the model's max_seq_len={model.cfg.max_seq_len}; evaluate a longer "
            "context with a config whose max_seq_len covers it (rope_factor=1 keeps plain RoPE: no extension)"
        )


@torch.no_grad()
def loss_per_position(model: DeepSeekV3, rows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token cross-entropy at each position over ``rows`` [n, T+1] (tokens = row[:, :-1], targets =
    row[:, 1:]). Returns [T], float64: entry i is the loss of predicting token i + 1 from tokens 0..i."""
    _check_length(model, rows.shape[1] - 1)
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    total = torch.zeros(rows.shape[1] - 1, dtype=torch.float64)
    try:
        for chunk in rows.split(batch_size):
            chunk = chunk.to(device)
            logits = model.logits(model.hidden(chunk[:, :-1]))  # [b, T, V]
            nll = F.cross_entropy(logits.float().transpose(1, 2), chunk[:, 1:], reduction="none")  # [b, T]
            total += nll.double().sum(0).cpu()
    finally:
        model.train(was_training)
    return total / rows.shape[0]


@torch.no_grad()
def needle_hits(model: DeepSeekV3, rows: torch.Tensor, answer_start: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Per row, whether the greedy prediction of every answer token is right (teacher-forced). rows [n, L],
    answer_start [n] (the answer runs from there to the end). Returns a bool tensor [n]."""
    _check_length(model, rows.shape[1])
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    hits = []
    try:
        for chunk, start in zip(rows.split(batch_size), answer_start.split(batch_size)):
            chunk = chunk.to(device)
            pred = model.logits(model.hidden(chunk[:, :-1])).argmax(-1)  # [b, L-1]: pred[:, i] guesses token i + 1
            pos = torch.arange(chunk.shape[1] - 1, device=device)[None, :]  # [1, L-1]
            in_answer = pos + 1 >= start.to(device)[:, None]  # predictions of answer tokens
            ok = (pred == chunk[:, 1:]) | ~in_answer
            hits.append(ok.all(dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(hits)


def needle_grid(
    model: DeepSeekV3,
    fmt: NeedleFormat,
    filler_rows: torch.Tensor,
    lengths: Sequence[int],
    depths: Sequence[float],
    seed: int = 0,
    batch_size: int = 8,
) -> pd.DataFrame:
    """The Fig. 8 grid: accuracy of :func:`needle_hits` at every (length, depth), one row per filler row (each with
    its own key, the same keys at every cell of a length). Columns: length, depth, accuracy, n."""
    out = []
    for length in lengths:
        for depth in depths:
            rows, start = needle_rows(fmt, filler_rows, length, depth, seed=seed)
            hits = needle_hits(model, rows, start, batch_size)
            out.append({"length": length, "depth": depth, "accuracy": float(hits.float().mean()), "n": len(hits)})
    return pd.DataFrame(out)


class NeedleMixture:
    """The ``dsv3lab.data`` interface (``batch``, ``val``, ``tokenizer``) over ``base`` (a ``dsv3lab.data.Datasets``):
    step s gives ``base.batch(s, B)`` (plain text), except every ``retrieval_every``-th step (s % k == k - 1), which
    gives needle rows of the same length built on those text rows — depth uniform in [0, 1] and key uniform, seeded by
    ``(seed, step)`` — with every target ignored except the answer's. A pure function of ``(step, batch_size)``, so a
    run resumes identically."""

    def __init__(self, base, fmt: NeedleFormat, retrieval_every: int = 2, seed: int = 0):
        if not isinstance(retrieval_every, int) or retrieval_every < 1:
            raise ValueError(f"retrieval_every must be a positive integer, got {retrieval_every!r}")
        if base.seq_len + 1 <= fmt.overhead:
            raise ValueError(f"seq_len {base.seq_len} leaves no room for filler next to the needle")
        self.base, self.fmt, self.retrieval_every, self.seed = base, fmt, retrieval_every, seed

    @property
    def tokenizer(self):
        return self.base.tokenizer

    @property
    def val(self) -> dict[str, torch.Tensor]:
        return self.base.val  # plain text: the validation loss stays next-token loss

    @property
    def seq_len(self) -> int:
        return self.base.seq_len

    def is_retrieval_step(self, step: int) -> bool:
        return step % self.retrieval_every == self.retrieval_every - 1

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, T], targets [B, T])."""
        tokens, targets = self.base.batch(step, batch_size)
        if not self.is_retrieval_step(step):
            return tokens, targets
        filler = torch.cat([tokens, targets[:, -1:]], dim=1)  # [B, T+1]: the packed text rows
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        depths = torch.rand(batch_size, generator=g)
        keys = torch.randint(0, len(self.fmt.digits), (batch_size, self.fmt.key_digits), generator=g)
        built = [self.fmt.row(f, self.seq_len + 1, float(d), k) for f, d, k in zip(filler, depths, keys)]
        rows = torch.stack([r for r, _ in built])  # [B, T+1]
        targets = rows[:, 1:].clone()
        answer = torch.arange(1, self.seq_len + 1)[None, :] >= torch.tensor([a for _, a in built])[:, None]
        targets[~answer] = IGNORE_INDEX  # only the answer's tokens are predicted in these rows
        return rows[:, :-1].contiguous(), targets
