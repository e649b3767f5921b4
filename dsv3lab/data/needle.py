"""A toy needle in a haystack (DeepSeek-V3 §4.3, Fig. 8): a pass key hidden in long filler text, asked for at the end.

The paper tests its 128K-context model by hiding a fact at a chosen *depth* of a long document and asking for it at
the end, across context lengths and depths (Fig. 8: all green). The toy version, at the token level::

    filler[:p]  "\\nThe pass key is " k1 k2 k3 ".\\n"  filler[p:]  "\\nWhat is the pass key? The pass key is " k1 k2 k3
                └──────────── the needle, at depth p / len(filler) ───┘                 └── the query ─┘ └ answer ┘

The key is ``key_digits`` random decimal digits, one token each (the tokenizer must encode every digit as a single
token: dsv3lab's split of numbers into runs of ≤ 3 digits leaves lone digits alone only when the key is built token
by token, as here). The filler is packed training or validation text of the data pipeline (the haystack); a model
that answers must attend from the query back to the needle, wherever it is.

``NeedleFormat.row`` builds one row, ``needle_rows`` a batch of evaluation rows at a given length and depth;
``dsv3lab.train.long_context`` trains on them (``NeedleMixture``) and scores a model (``needle_grid``).

Notebook: 12_long_context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEEDLE = "\nThe pass key is "
NEEDLE_END = ".\n"
QUERY = "\nWhat is the pass key? The pass key is "


@dataclass
class NeedleFormat:
    """The token ids of the needle's and the query's fixed text and of the ten digits, for one tokenizer."""

    needle: list[int]
    needle_end: list[int]
    query: list[int]
    digits: list[int]  # token id of each symbol of the key alphabet
    key_digits: int = 3

    @classmethod
    def for_tokenizer(cls, tokenizer, key_digits: int = 3, alphabet: str = "0123456789") -> NeedleFormat:
        """The format for ``tokenizer``: keys of ``key_digits`` symbols of ``alphabet`` (each must be one token)."""
        if not isinstance(key_digits, int) or key_digits < 1:
            raise ValueError(f"key_digits must be a positive integer, got {key_digits!r}")
        if len(set(alphabet)) < 2 or len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet must hold at least 2 distinct symbols, got {alphabet!r}")
        digits = []
        for d in alphabet:
            ids = tokenizer.encode(d)
            if len(ids) != 1:
                raise ValueError(f"the tokenizer encodes the key symbol {d!r} as {ids}: each must be one token")
            digits.append(ids[0])
        return cls(tokenizer.encode(NEEDLE), tokenizer.encode(NEEDLE_END), tokenizer.encode(QUERY), digits, key_digits)

    @property
    def overhead(self) -> int:
        """Tokens a row spends on the needle, the query and the answer (the rest is filler)."""
        return len(self.needle) + len(self.needle_end) + len(self.query) + 2 * self.key_digits

    def row(self, filler: torch.Tensor, length: int, depth: float, key: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One row of ``length`` tokens with the needle at ``depth`` (0 = start of the filler, 1 = its end).

        ``filler``: [≥ length - overhead] token ids; ``key``: [key_digits] indices into the alphabet. Returns
        (row [length], the position of the first answer token)."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        n_fill = length - self.overhead
        if n_fill < 0:
            raise ValueError(f"length {length} is shorter than the needle, query and answer ({self.overhead} tokens)")
        if filler.numel() < n_fill:
            raise ValueError(f"the filler has {filler.numel()} tokens, the row needs {n_fill}")
        key_ids = torch.tensor(self.digits)[key]  # [key_digits]
        at = round(depth * n_fill)
        needle, needle_end, query = (
            torch.tensor(ids, dtype=torch.long) for ids in (self.needle, self.needle_end, self.query)
        )
        needle = torch.cat([needle, key_ids, needle_end])
        row = torch.cat([filler[:at], needle, filler[at:n_fill], query, key_ids])  # [length]
        return row, length - self.key_digits


def needle_rows(
    fmt: NeedleFormat, filler_rows: torch.Tensor, length: int, depth: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation rows: one per filler row, each with its own random key, the needle at ``depth``.

    filler_rows: [n, ≥ length] packed text. Returns (rows [n, length], answer_start [n]): the answer digits are
    ``rows[i, answer_start[i]:]`` and the model must predict them from the positions just before."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, len(fmt.digits), (len(filler_rows), fmt.key_digits), generator=g)
    built = [fmt.row(f, length, depth, k) for f, k in zip(filler_rows, keys)]
    return torch.stack([r for r, _ in built]), torch.tensor([a for _, a in built])
