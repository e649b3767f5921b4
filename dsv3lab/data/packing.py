"""Fill-in-the-middle (PSM layout) per document, and packing of documents into fixed-length rows.

**FIM (§4.1).** DeepSeek-V3 applies the Fill-in-Middle strategy of DeepSeek-Coder-V2 to 10% of its documents, in the
Prefix-Suffix-Middle layout::

    <|fim_begin|> f_pre <|fim_hole|> f_suf <|fim_end|> f_middle <|eos_token|>

so the model learns to produce the middle given both sides, while ordinary next-token prediction is kept.
dsv3lab applies it per document *after* tokenization: with probability ``rate`` a document's token list is cut at two
token positions ``0 <= i <= j <= n`` (each drawn uniformly from 0..n, then sorted, so any part may be empty) into
prefix ``[0, i)``, middle ``[i, j)`` and suffix ``[j, n)``. Cutting tokens rather than characters makes FIM a pure
rearrangement: every token of the document is kept exactly once (tested), the cached tokenization is reused, and
:func:`undo_fim` recovers the original. Every document, FIM or not, is wrapped ``bos … eos``.

**Packing.** Documents (already wrapped) are concatenated in the given order into one stream and cut into rows of
``seq_len + 1`` tokens (inputs ``row[:-1]``, targets ``row[1:]``), with no attention mask between documents — as in the
paper, documents are packed without cross-sample masking; ``bos``/``eos`` tell the model where one ends. Rows do not
overlap: every token of the stream appears exactly once, and the final partial row is dropped (at most ``seq_len``
tokens lost), or padded with ``pad_id`` when one is given.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import numpy as np
import torch

from .tokenizer import Tokenizer


def check_fim_rate(rate: float) -> None:
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"fim_rate must be a number in [0, 1] (the paper uses 0.1), got {rate!r}")


def check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (tokens per training row), got {seq_len!r}")


def apply_fim(
    ids: Sequence[int], tokenizer: Tokenizer, rng: random.Random | np.random.Generator, rate: float = 0.1
) -> list[int]:
    """One document's tokens → ``bos doc eos``, or with probability ``rate`` the PSM form
    ``bos <fim_begin> prefix <fim_hole> suffix <fim_end> middle eos``.

    ``rng`` is a ``random.Random`` or a NumPy ``Generator`` (only ``rng.random()`` is used: one draw for the
    decision, two more for the cut points when the document is rearranged).
    """
    check_fim_rate(rate)
    ids = list(ids)
    if rate > 0 and rng.random() < rate:
        n = len(ids)
        i, j = sorted(min(int(rng.random() * (n + 1)), n) for _ in range(2))
        prefix, middle, suffix = ids[:i], ids[i:j], ids[j:]
        return [
            tokenizer.bos_id,
            tokenizer.fim_prefix_id,
            *prefix,
            tokenizer.fim_suffix_id,
            *suffix,
            tokenizer.fim_middle_id,
            *middle,
            tokenizer.eos_id,
        ]
    return [tokenizer.bos_id, *ids, tokenizer.eos_id]


def undo_fim(ids: Sequence[int], tokenizer: Tokenizer) -> list[int]:
    """Inverse of :func:`apply_fim`: a wrapped document (plain or PSM) → its original tokens, without bos/eos."""
    ids = list(ids)
    if len(ids) < 2 or ids[0] != tokenizer.bos_id or ids[-1] != tokenizer.eos_id:
        raise ValueError("expected one document wrapped as bos ... eos")
    body = ids[1:-1]
    if not body or body[0] != tokenizer.fim_prefix_id:
        return body
    try:
        s = body.index(tokenizer.fim_suffix_id)
        m = body.index(tokenizer.fim_middle_id, s + 1)
    except ValueError:
        raise ValueError("a FIM document must hold <fim_begin> ... <fim_hole> ... <fim_end> ...") from None
    prefix, suffix, middle = body[1:s], body[s + 1 : m], body[m + 1 :]
    return prefix + middle + suffix


def is_fim(ids: Sequence[int], tokenizer: Tokenizer) -> bool:
    """True for a wrapped document in the PSM layout."""
    return len(ids) > 1 and ids[1] == tokenizer.fim_prefix_id


def pack(docs_ids: Sequence[Sequence[int]], seq_len: int, pad_id: int | None = None) -> torch.Tensor:
    """Concatenate documents and cut the stream into rows of ``seq_len + 1`` tokens.

    Returns a LongTensor ``[N, seq_len + 1]``: ``N = total // (seq_len + 1)`` when ``pad_id`` is None (the final
    partial row is dropped), else ``ceil(total / (seq_len + 1))`` with the last row padded by ``pad_id``.
    ``rows.flatten()`` is the stream (up to the dropped tail or the padding).
    """
    check_seq_len(seq_len)
    stream = stream_of(docs_ids)  # [total]
    width = seq_len + 1
    n_full = len(stream) // width
    if pad_id is None or len(stream) % width == 0:
        rows = stream[: n_full * width].reshape(n_full, width)  # [N, T+1]
    else:
        rows = np.full(((n_full + 1) * width,), pad_id, dtype=np.int64)
        rows[: len(stream)] = stream
        rows = rows.reshape(n_full + 1, width)  # [N, T+1]
    return torch.from_numpy(np.ascontiguousarray(rows))


def stream_of(docs_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """All documents back to back as one int64 array ``[total]``."""
    total = sum(len(d) for d in docs_ids)
    return np.fromiter(itertools.chain.from_iterable(docs_ids), dtype=np.int64, count=total)
