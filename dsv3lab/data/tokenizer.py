"""Byte-level BPE tokenizer (trained with Hugging Face ``tokenizers``) with bos/eos/pad and the three FIM tokens.

DeepSeek-V3 uses byte-level BPE with a 128K vocabulary (§4.1); dsv3lab trains the same kind of tokenizer at 8192
entries on its offline corpus. Byte level means every string round-trips exactly (``decode(encode(s)) == s``): the
256 byte symbols are always in the vocabulary, so nothing is ever unknown.

Special tokens take the first ids, in this order (``bos = 0`` and ``eos = 1`` match ``ModelConfig``'s defaults):

=====  =========================  ==============================================================
id     token                      role
=====  =========================  ==============================================================
0      ``<|begin_of_sentence|>``  bos: starts every document
1      ``<|end_of_sentence|>``    eos: ends every document
2      ``<|pad|>``                padding (only when a caller asks ``pack`` to pad)
3      ``<|fim_begin|>``          FIM prefix marker   (PSM: ``<|fim_begin|> prefix``)
4      ``<|fim_hole|>``           FIM suffix marker   (``<|fim_hole|> suffix``)
5      ``<|fim_end|>``            FIM middle marker   (``<|fim_end|> middle``), DeepSeek's names
=====  =========================  ==============================================================

Document text never produces special ids: the wrapper sets ``encode_special_tokens`` so a literal
``<|end_of_sentence|>`` inside a file is encoded as ordinary bytes; special ids are inserted only by code.

Pre-tokenization: digits are isolated in runs of at most three (``\\p{N}{1,3}``), then GPT-2's byte-level regex.
Training is deterministic: the same documents give the same ``tokenizer.json`` (tested).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from ..files import atomic_path, atomic_write_json

SPECIAL_TOKENS = {
    "bos": "<|begin_of_sentence|>",
    "eos": "<|end_of_sentence|>",
    "pad": "<|pad|>",
    "fim_prefix": "<|fim_begin|>",
    "fim_suffix": "<|fim_hole|>",
    "fim_middle": "<|fim_end|>",
}
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens
DEFAULT_VOCAB_SIZE = 8192
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TOKENIZER_DIR = REPO_ROOT / "data" / "tokenizer"


class Tokenizer:
    """A thin wrapper over a ``tokenizers.Tokenizer`` (``.hf``) that knows the special ids.

    Attributes: ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``, ``fim_prefix_id``, ``fim_suffix_id``,
    ``fim_middle_id``, ``special_ids`` (a frozenset).
    """

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        missing = [tok for tok in SPECIAL_TOKENS.values() if hf.token_to_id(tok) is None]
        if missing:
            raise ValueError(
                f"tokenizer lacks the special token(s) {missing}; dsv3lab needs {list(SPECIAL_TOKENS.values())}"
            )
        hf.encode_special_tokens = True  # document text never turns into special ids
        ids = {name: hf.token_to_id(tok) for name, tok in SPECIAL_TOKENS.items()}
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        self.fim_prefix_id, self.fim_suffix_id, self.fim_middle_id = (
            ids["fim_prefix"],
            ids["fim_suffix"],
            ids["fim_middle"],
        )
        self.special_ids = frozenset(ids.values())
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos added)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` for many texts, in parallel threads inside ``tokenizers``."""
        return [e.ids for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens are shown as their strings unless ``skip_special_tokens``."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token(self, i: int) -> str:
        """The vocabulary string of id ``i`` (byte-level symbols, e.g. ``Ġ`` for a space)."""
        return self.hf.id_to_token(int(i))

    # ------------------------------------------------------------------ persistence
    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of the serialized tokenizer: part of every data-cache key."""
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()[:16]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/tokenizer.json`` and ``directory/special_tokens.json``; return the tokenizer.json path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / "tokenizer.json"
        with atomic_path(path) as tmp:
            self.hf.save(str(tmp), pretty=True)
        special = {name: {"token": tok, "id": self.hf.token_to_id(tok)} for name, tok in SPECIAL_TOKENS.items()}
        atomic_write_json(d / "special_tokens.json", special)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a ``tokenizer.json`` file or a folder holding one."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(f"no tokenizer at {str(p)!r}; expected a tokenizer.json file or a folder with one")
        return cls(read_tokenizer_json(p))


def read_tokenizer_json(path: str | os.PathLike) -> HFTokenizer:
    """A ``tokenizers.Tokenizer`` from a tokenizer.json file; a corrupt file is a ``ValueError`` naming it."""
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for a corrupt file
        raise ValueError(f"{path} is not a readable tokenizer.json ({err})") from None


def _new_hf_tokenizer() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} (256 byte symbols + "
            f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}"
        )


def train_tokenizer(docs: Iterable, vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0) -> Tokenizer:
    """Train a byte-level BPE on ``docs`` (Documents or strings) with the special tokens at ids 0–5.

    Only ``train``-split documents are used when Documents are given. ``seed`` is accepted for API symmetry: BPE
    training in ``tokenizers`` is deterministic (ties between equally frequent pairs are broken by the pair itself),
    and the documents are fed in their given order. A corpus too small to reach ``vocab_size`` merges gives a smaller
    vocabulary (``Tokenizer.vocab_size`` is the truth).
    """
    check_vocab_size(vocab_size)
    del seed
    texts = [d if isinstance(d, str) else d.text for d in docs if isinstance(d, str) or d.split == "train"]
    if not texts:
        raise ValueError("train_tokenizer needs at least one training document")
    tok = _new_hf_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return Tokenizer(tok)


def default_tokenizer() -> Tokenizer:
    """The committed tokenizer ``data/tokenizer/tokenizer.json`` (vocabulary 8192, trained on the default built-in
    corpus by ``python -m dsv3lab.data.build_tokenizer``)."""
    path = DEFAULT_TOKENIZER_DIR / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"the default tokenizer {str(path)!r} is missing (it is committed in the repository); "
            "rebuild it with `python -m dsv3lab.data.build_tokenizer`"
        )
    return Tokenizer.load(path)
