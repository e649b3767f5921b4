"""``DataConfig`` → ``Datasets``: corpus → tokenizer → FIM → packing → tensors cached on disk → batches by step.

The whole pipeline of §4.1 at toy size. ``make_datasets(cfg)`` builds the corpus, tokenizes every document once (the
Rust ``tokenizers`` library, in parallel), applies FIM to the shuffled training documents, packs them into rows of
``seq_len + 1`` tokens, packs each domain's validation documents separately (no FIM: validation measures plain
next-token prediction per domain), and saves the tensors under ``cache_dir`` keyed by a hash of the config, the
tokenizer and the corpus (the Python version for the built-in corpus; file sizes and times for a folder). A second
call loads them in well under a second.

``Datasets.batch(step, batch_size)`` is an index operation on the pre-tokenized tensor and a pure function of
``(seed, step, batch_size)``: sample ``k = step * batch_size + b`` is row ``perm_e[k mod N]`` of epoch ``e = k // N``,
where ``perm_e`` is a permutation seeded by ``(seed, e)``. Resuming at step k gives exactly the batches an
uninterrupted run would have seen, and every epoch visits every row once in a new order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import random
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..files import atomic_path
from .corpus import DOMAINS, Document, builtin_corpus, corpus_digest, corpus_stats, folder_corpus
from .packing import apply_fim, check_fim_rate, check_seq_len, pack
from .tokenizer import DEFAULT_VOCAB_SIZE, REPO_ROOT, Tokenizer, check_vocab_size, default_tokenizer, train_tokenizer

FORMAT_VERSION = 1  # bump when the corpus builders or the cache layout change: old caches are then ignored
# data/cache/ of the repository (git-ignored) wherever the caller's working directory is (notebooks run in notebooks/);
# a copy installed without the repository caches under ~/.cache/dsv3lab instead
DEFAULT_CACHE_DIR = (
    REPO_ROOT / "data" / "cache"
    if (REPO_ROOT / "pyproject.toml").is_file()
    else Path.home() / ".cache" / "dsv3lab" / "data"
)


@dataclass
class DataConfig:
    """Everything that determines the data. Invalid values raise ``ValueError`` naming the field."""

    corpus: str = "builtin"  # "builtin" or a folder of UTF-8 text files
    vocab_size: int = DEFAULT_VOCAB_SIZE  # the model's vocabulary; the tokenizer must fit in it
    seq_len: int = 256  # T: tokens per training row are T + 1 (inputs [:-1], targets [1:])
    fim_rate: float = 0.1  # share of training documents rearranged into PSM (§4.1: 0.1)
    seed: int = 0  # corpus selection, split, math problems, FIM, document order and batch order
    val_fraction: float = 0.05  # expected share of documents held out for validation
    max_chars_per_domain: int | None = 2_000_000  # whole documents up to this many characters per domain
    val_seqs_per_domain: int = 32  # validation rows kept per domain (fewer if the domain has fewer)
    tokenizer: str | None = None  # a tokenizer.json (or folder); None: the committed one at 8192, else train one
    domains: tuple[str, ...] | None = None  # built-in: a subset of DOMAINS (None = all); folder: one label ("user")

    def __post_init__(self) -> None:
        if isinstance(self.domains, list):
            self.domains = tuple(self.domains)
        self.validate()

    @classmethod
    def small(cls, **overrides: Any) -> DataConfig:
        """A fast configuration for tests and fast-mode notebooks: 200,000 characters per domain."""
        return cls(**{"max_chars_per_domain": 200_000, "val_seqs_per_domain": 8, **overrides})

    def validate(self) -> None:
        if not isinstance(self.corpus, (str, os.PathLike)) or not str(self.corpus):
            raise ValueError(f"corpus must be 'builtin' or a folder path, got {self.corpus!r}")
        check_vocab_size(self.vocab_size)
        check_seq_len(self.seq_len)
        check_fim_rate(self.fim_rate)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_chars_per_domain is not None and (
            not isinstance(self.max_chars_per_domain, int) or self.max_chars_per_domain < 1000
        ):
            raise ValueError(
                f"max_chars_per_domain must be None or an integer >= 1000, got {self.max_chars_per_domain!r}"
            )
        if self.max_chars_per_domain is None and self.is_builtin and "math" in self.domain_names:
            raise ValueError(
                "max_chars_per_domain=None (no cap) is not allowed with the built-in 'math' domain: its "
                "problems are generated without end; give a number of characters"
            )
        if not isinstance(self.val_seqs_per_domain, int) or self.val_seqs_per_domain < 1:
            raise ValueError(f"val_seqs_per_domain must be a positive integer, got {self.val_seqs_per_domain!r}")
        if self.domains is not None:
            if not self.domains or not all(isinstance(d, str) and d for d in self.domains):
                raise ValueError(f"domains must be None or a non-empty tuple of names, got {self.domains!r}")
            if self.is_builtin:
                unknown = [d for d in self.domains if d not in DOMAINS]
                if unknown:
                    raise ValueError(f"unknown domain(s) {unknown}; the built-in corpus has {DOMAINS}")
            elif len(self.domains) != 1:
                raise ValueError(
                    f"a folder corpus has one domain label; domains must be None or one name, got {self.domains!r}"
                )

    @property
    def is_builtin(self) -> bool:
        return str(self.corpus) == "builtin"

    @property
    def domain_names(self) -> tuple[str, ...]:
        if self.domains is not None:
            return self.domains
        return DOMAINS if self.is_builtin else ("user",)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["corpus"] = str(self.corpus)
        d["domains"] = list(self.domain_names)
        return d


def load_corpus(cfg: DataConfig) -> list[Document]:
    """The documents ``cfg`` describes (built-in or a folder), labelled and split."""
    if cfg.is_builtin:
        return builtin_corpus(
            seed=cfg.seed,
            max_chars_per_domain=cfg.max_chars_per_domain,
            val_fraction=cfg.val_fraction,
            domains=cfg.domain_names,
        )
    return folder_corpus(
        cfg.corpus,
        domain=cfg.domain_names[0],
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        max_chars=cfg.max_chars_per_domain,
    )


def corpus_fingerprint(cfg: DataConfig) -> str:
    """What the corpus depends on besides ``cfg``: the interpreter (its stdlib) or the folder's files."""
    if cfg.is_builtin:
        return f"builtin|{platform.python_implementation()} {sys.version}|{sysconfig.get_paths()['stdlib']}"
    root = Path(cfg.corpus)
    if not root.is_dir():
        folder_corpus(root)  # raises the clear error for a missing folder or a file
    h = hashlib.sha256(str(root.resolve()).encode())
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits ``n`` rows, seeded by ``(seed, epoch)``."""
    return np.random.default_rng((seed, 0xDA7A, epoch)).permutation(n)


def sample_rows(n: int, step: int, batch_size: int, perm: Callable[[int], np.ndarray]) -> np.ndarray:
    """Row indices ``[B]`` of batch ``step`` over ``n`` rows: sample ``k = step·B + b`` is row ``perm(e)[k mod n]`` of
    epoch ``e = k // n`` — a pure function of ``(step, batch_size)``, so a resumed run sees the same batches."""
    if not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    k = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)  # global sample numbers
    epochs, pos = k // n, k % n
    rows = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        rows[sel] = perm(int(e))[pos[sel]]
    return rows


@dataclass
class Datasets:
    """Packed training rows, per-domain validation rows, and the tokenizer that made them."""

    tokenizer: Tokenizer
    domains: list[str]
    seq_len: int
    train: torch.Tensor  # [N, T+1] int64: packed documents of all domains (FIM applied), in seeded order
    val: dict[str, torch.Tensor]  # domain -> [n, T+1] int64, packed from that domain's validation documents only
    train_domains: torch.Tensor  # [N, T+1] int8: index into `domains` of the document each train token came from
    seed: int = 0
    stats: dict[str, Any] = field(default_factory=dict)  # counts per domain, build time, cache file
    _perms: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            self._perms[epoch] = epoch_permutation(len(self.train), self.seed, epoch)
        return self._perms[epoch]

    def batch_rows(self, step: int, batch_size: int) -> np.ndarray:
        """Row indices ``[B]`` of batch ``step`` (see the module docstring)."""
        return sample_rows(len(self.train), step, batch_size, self._perm)

    def batch(
        self, step: int, batch_size: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens ``[B, T]``, targets ``[B, T]``) for optimizer step ``step``; targets are tokens shifted by one."""
        # NumPy gathers and copies on one thread: torch's parallel indexing stalls on a busy 2-core machine
        rows = self.train.numpy()[self.batch_rows(step, batch_size)]  # [B, T+1]
        x = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))  # [B, T]
        y = torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))  # [B, T]
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return x, y

    def val_batches(self, domain: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(tokens, targets) ``[b, T]`` over every validation row of ``domain``, in order."""
        if domain not in self.val:
            raise ValueError(f"unknown domain {domain!r}; validation domains: {list(self.val)}")
        rows = self.val[domain]  # [n, T+1]
        for i in range(0, len(rows), batch_size):
            r = rows[i : i + batch_size]
            yield r[:, :-1].contiguous(), r[:, 1:].contiguous()

    def epoch(self, step: int, batch_size: int) -> float:
        """Epochs of training data consumed after ``step`` steps."""
        return step * batch_size / len(self.train)

    def num_tokens(self) -> dict[str, Any]:
        """Token counts: rows, tokens in the packed tensors, and per-domain document/character/token counts."""
        width = self.seq_len + 1
        in_rows = torch.bincount(self.train_domains.flatten().long(), minlength=len(self.domains))
        return {
            "train_rows": len(self.train),
            "train": len(self.train) * width,
            "val": {d: len(v) * width for d, v in self.val.items()},
            "train_by_domain": {d: int(in_rows[i]) for i, d in enumerate(self.domains)},
            "by_domain": self.stats.get("by_domain", {}),
        }


def resolve_tokenizer(cfg: DataConfig, cache_dir: Path, docs: Callable[[], list[Document]]) -> Tokenizer:
    """``cfg.tokenizer`` if given; else the committed default at vocab 8192; else one trained on the training
    documents and cached under ``cache_dir/tokenizers/``."""
    if cfg.tokenizer is not None:
        tok = Tokenizer.load(cfg.tokenizer)
    elif cfg.vocab_size == DEFAULT_VOCAB_SIZE:
        tok = default_tokenizer()
    else:
        key = _key(
            "tokenizer",
            FORMAT_VERSION,
            cfg.vocab_size,
            cfg.seed,
            cfg.max_chars_per_domain,
            cfg.val_fraction,
            cfg.domain_names,
            corpus_fingerprint(cfg),
        )
        path = cache_dir / "tokenizers" / key
        tok = None
        if (path / "tokenizer.json").is_file():
            try:
                tok = Tokenizer.load(path)
            except ValueError as err:  # a corrupt cache entry: rebuild it
                warnings.warn(f"the cached tokenizer {path} is unreadable ({err}); training it again", stacklevel=2)
        if tok is None:
            tok = train_tokenizer(docs(), vocab_size=cfg.vocab_size, seed=cfg.seed)
            tok.save(path)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {tok.vocab_size} entries but vocab_size={cfg.vocab_size}: token ids "
            "must fit the model's vocabulary; raise vocab_size or use another tokenizer"
        )
    return tok


def make_datasets(
    cfg: DataConfig, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, log: Callable[[str], None] | None = None
) -> Datasets:
    """Build (or load from ``cache_dir``) the tensors ``cfg`` describes. ``log`` receives one line per build."""
    cfg.validate()
    cache_dir = Path(cache_dir)
    corpus: list[Document] = []

    def docs() -> list[Document]:
        if not corpus:
            corpus.extend(load_corpus(cfg))
        return corpus

    t0 = time.perf_counter()
    tok = resolve_tokenizer(cfg, cache_dir, docs)
    key = _key(FORMAT_VERSION, cfg.to_dict(), tok.fingerprint(), corpus_fingerprint(cfg))
    path = cache_dir / f"data-{key}.safetensors"
    if path.is_file():
        try:
            return _load_cached(path, tok, cfg, t0)
        except (OSError, KeyError, ValueError, SafetensorError) as err:  # truncated or corrupt: rebuild it
            warnings.warn(f"the data cache {path} is unreadable ({err}); rebuilding it", stacklevel=2)
            path.unlink(missing_ok=True)
    ds = build_datasets(cfg, tok, docs())
    ds.stats.update(build_seconds=round(time.perf_counter() - t0, 2), from_cache=False, cache_file=str(path))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"train": ds.train.to(torch.int32), "train_domains": ds.train_domains}
    tensors.update({f"val.{d}": v.to(torch.int32) for d, v in ds.val.items()})
    meta = {"domains": ds.domains, "config": cfg.to_dict(), "stats": ds.stats}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    if log:
        log(f"[data] built {ds.num_tokens()['train']:,} training tokens in {ds.stats['build_seconds']:.1f}s -> {path}")
    return ds


def _load_cached(path: Path, tok: Tokenizer, cfg: DataConfig, t0: float) -> Datasets:
    """The datasets of a cache file written by :func:`make_datasets`."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    t = load_file(str(path))
    ds = Datasets(
        tok,
        meta["domains"],
        cfg.seq_len,
        t["train"].long(),
        {d: t[f"val.{d}"].long() for d in meta["domains"]},
        t["train_domains"],
        cfg.seed,
        {
            **meta["stats"],
            "from_cache": True,
            "cache_file": str(path),
            "load_seconds": round(time.perf_counter() - t0, 3),
        },
    )
    return ds


def build_datasets(cfg: DataConfig, tok: Tokenizer, docs: list[Document]) -> Datasets:
    """Tokenize, FIM, pack (no caching). See the module docstring."""
    domains = [d for d in cfg.domain_names if any(doc.domain == d for doc in docs)]
    ids = tok.encode_batch([d.text for d in docs])
    by_domain = corpus_stats(docs)
    for d in by_domain:
        by_domain[d].update(train_tokens=0, val_tokens=0)
    for doc, x in zip(docs, ids):
        by_domain[doc.domain][f"{doc.split}_tokens"] += len(x) + 2  # + bos, eos

    # training stream: all domains, shuffled by seed; FIM per document before packing (§4.1)
    train_idx = [i for i, d in enumerate(docs) if d.split == "train"]
    random.Random(f"shuffle:{cfg.seed}").shuffle(train_idx)
    fim_rng = random.Random(f"fim:{cfg.seed}")
    wrapped = [apply_fim(ids[i], tok, fim_rng, cfg.fim_rate) for i in train_idx]
    fim_docs = sum(1 for w in wrapped if len(w) > 1 and w[1] == tok.fim_prefix_id)
    train = pack(wrapped, cfg.seq_len)  # [N, T+1]
    dom_index = {d: k for k, d in enumerate(domains)}
    labels = np.repeat(
        np.array([dom_index[docs[i].domain] for i in train_idx], dtype=np.int8), [len(w) for w in wrapped]
    )[: train.numel()]
    train_domains = torch.from_numpy(labels.reshape(train.shape).copy())  # [N, T+1]

    # validation: each domain packed from its own documents, no FIM
    val = {}
    for d in domains:
        idx = [i for i, doc in enumerate(docs) if doc.domain == d and doc.split == "val"]
        random.Random(f"val:{cfg.seed}:{d}").shuffle(idx)
        rows = pack([[tok.bos_id, *ids[i], tok.eos_id] for i in idx], cfg.seq_len)[: cfg.val_seqs_per_domain]
        if len(rows) == 0:
            n = sum(len(ids[i]) + 2 for i in idx)
            raise ValueError(
                f"domain {d!r} has {len(idx)} validation document(s) with {n} tokens, fewer than one row "
                f"of seq_len + 1 = {cfg.seq_len + 1}; raise max_chars_per_domain or val_fraction, add "
                "documents, or lower seq_len"
            )
        val[d] = rows
    if len(train) == 0:
        raise ValueError(f"the training documents hold fewer than seq_len + 1 = {cfg.seq_len + 1} tokens")
    stats = {
        "by_domain": by_domain,
        "fim_docs": fim_docs,
        "train_docs": len(train_idx),
        "stream_tokens": sum(len(w) for w in wrapped),
        "train_corpus_sha256": corpus_digest(docs, "train"),
        "tokenizer_fingerprint": tok.fingerprint(),
    }
    return Datasets(tok, domains, cfg.seq_len, train, val, train_domains, cfg.seed, stats)
