"""Supervised fine-tuning on worked solutions (DeepSeek-V3 §5.1), on dsv3lab's generated math problems.

DeepSeek-V3's SFT trains on 1.5M instruction/response pairs for two epochs; the loss counts only the response. Here
the pairs are :class:`dsv3lab.data.MathProblem` s — prompt ``"Problem: <question>\\nSolution:"``, response
``" <worked steps>\\nAnswer: <answer>\\n"`` — one example per row, never packed with another::

    tokens   bos  Problem: … Solution:  ␣steps … Answer: 42 \\n   pad pad
    targets       ── IGNORE_INDEX ───── steps … Answer: 42 \\n eos  IGNORE
                  (the prompt predicts nothing)                     (padding neither)

The loss is the mean over response tokens (and the eos that ends them), exactly the pre-training loss with the
prompt's and the padding's targets set to ``IGNORE_INDEX``. So SFT *is* :func:`dsv3lab.train.train` with this data:
the same optimizer step, schedules, run folder, checkpoints and bit-identical resume; ``TrainConfig.stage = "sft"``
makes :func:`~dsv3lab.train.trainer.make_data` build it (``dsv3lab train --stage sft --from RUN``).

Problems: training problems come from the stream ``math_problem(data_seed + 1000, i)``, held-out ones from
``data_seed + 2000``, both filtered by ``math_kinds`` and by fitting into ``seq_len + 1`` tokens. Templates with few
distinct instances (39 square roots, 40 powers) repeat across streams: their "held-out" accuracy measures recall.

Notebook: 13_post_training.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..config import ModelConfig
from ..data import Tokenizer, default_tokenizer
from ..data.loader import epoch_permutation, sample_rows
from ..data.math_problems import MathProblem, math_problem
from ..model.transformer import IGNORE_INDEX
from .checkpoint import RUN_FILE
from .config import TrainConfig
from .stages import resolve_checkpoint

TRAIN_STREAM, EVAL_STREAM = 1000, 2000  # problem seeds: data_seed + these
POOL = 20_000  # problem indices drawn per stream before filtering by kind and length


def problems(seed: int, kinds: Sequence[str] = (), n: int = POOL) -> list[MathProblem]:
    """Problems ``0 .. n-1`` of stream ``seed`` whose kind is in ``kinds`` (all when empty)."""
    out = [math_problem(seed, i) for i in range(n)]
    return [p for p in out if not kinds or p.kind in kinds]


def encode_example(tokenizer, problem: MathProblem) -> tuple[list[int], list[int]]:
    """(prompt ids with the bos token first, response ids with the eos token last)."""
    return [tokenizer.bos_id, *tokenizer.encode(problem.prompt)], [
        *tokenizer.encode(problem.completion),
        tokenizer.eos_id,
    ]


def sft_rows(examples: Sequence[tuple[list[int], list[int]]], seq_len: int, pad_id: int):
    """(tokens [n, T], targets [n, T]) with the prompt and the padding masked (``IGNORE_INDEX``), T = seq_len.

    Each example is prompt + response = L ≤ T + 1 tokens: tokens = ids[:-1] then padding, targets = ids[1:] with the
    first len(prompt) - 1 entries (positions that predict prompt tokens) and the padding ignored."""
    tokens = torch.full((len(examples), seq_len), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, response) in enumerate(examples):
        ids = torch.tensor(prompt + response)
        if len(ids) > seq_len + 1:
            raise ValueError(f"example {i} has {len(ids)} tokens; seq_len={seq_len} holds at most {seq_len + 1}")
        tokens[i, : len(ids) - 1] = ids[:-1]
        targets[i, len(prompt) - 1 : len(ids) - 1] = ids[len(prompt) :]  # predict the response, eos included
    return tokens, targets


class SFTData:
    """The ``dsv3lab.data`` interface for SFT: ``batch(step, B)`` (a pure function of step and B, epochs reshuffled by
    ``seed``), ``val`` ({"math": (tokens, targets)} of held-out problems, prompts masked), ``tokenizer``, and the
    problems themselves (``train_problems``, ``eval_problems``)."""

    def __init__(self, tokenizer, seq_len: int, seed: int = 0, kinds: Sequence[str] = (), n_eval: int = 64):
        self.tokenizer, self.seq_len, self.seed = tokenizer, seq_len, seed

        def fitting(stream: int) -> tuple[list[MathProblem], list[tuple[list[int], list[int]]]]:
            ps, ex = [], []
            for p in problems(seed + stream, kinds):
                e = encode_example(tokenizer, p)
                if len(e[0]) + len(e[1]) <= seq_len + 1:
                    ps.append(p)
                    ex.append(e)
            if not ps:
                raise ValueError(f"no {list(kinds) or 'math'} problem fits into seq_len={seq_len} (+1) tokens")
            return ps, ex

        self.train_problems, train_examples = fitting(TRAIN_STREAM)
        self.eval_problems, eval_examples = fitting(EVAL_STREAM)
        self.eval_problems, eval_examples = self.eval_problems[:n_eval], eval_examples[:n_eval]
        self.tokens, self.targets = sft_rows(train_examples, seq_len, tokenizer.pad_id)
        self.val = {"math": sft_rows(eval_examples, seq_len, tokenizer.pad_id)}

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = sample_rows(len(self.tokens), step, batch_size, self._perm)
        return self.tokens[rows], self.targets[rows]

    def _perm(self, epoch: int) -> np.ndarray:
        return epoch_permutation(len(self.tokens), self.seed, epoch)


def run_tokenizer(cfg: TrainConfig, model_cfg: ModelConfig):
    """The tokenizer of a post-training stage: its parent run's (``tokenizer/`` next to ``run.json``), else the
    committed default when the vocabulary is its 8192."""
    if cfg.init_from:
        folder = resolve_checkpoint(cfg.init_from).parent
        if (folder / RUN_FILE).exists() and (folder / "tokenizer").exists():
            return Tokenizer.load(folder / "tokenizer")
    if model_cfg.vocab_size == 8192:
        return default_tokenizer()
    raise ValueError(
        f"stage={cfg.stage!r} needs a tokenizer: start from a run with a tokenizer/ folder (init_from) or use the "
        f"default vocabulary of 8192 (vocab_size is {model_cfg.vocab_size})"
    )


def make_sft_data(cfg: TrainConfig, model_cfg: ModelConfig, tokenizer=None) -> SFTData:
    """The SFT data of ``cfg``: its ``math_kinds``, ``seq_len``, ``data_seed`` and ``eval_problems``."""
    tokenizer = tokenizer or run_tokenizer(cfg, model_cfg)
    return SFTData(tokenizer, cfg.seq_len, cfg.data_seed, cfg.kinds, cfg.eval_problems)


def describe(data: SFTData) -> dict:
    """Counts for a table: problems per split, response tokens, kinds."""
    n_resp = int((data.targets != IGNORE_INDEX).sum())
    kinds = sorted({p.kind for p in data.train_problems})
    return {
        "train_problems": len(data.train_problems),
        "eval_problems": len(data.eval_problems),
        "kinds": kinds,
        "response_tokens": n_resp,
        "distinct_train_questions": len({p.question for p in data.train_problems}),
    }
