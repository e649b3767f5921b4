"""Regenerate the committed default tokenizer ``data/tokenizer/`` deterministically.

    python -m dsv3lab.data.build_tokenizer            # train and write data/tokenizer/
    python -m dsv3lab.data.build_tokenizer --check    # train and compare with the committed file (exit 1 if not equal)

It trains a byte-level BPE of 8192 entries on the training split of the default built-in corpus
(``DataConfig()``: seed 0, 2,000,000 characters per domain, 5% validation documents held out). The corpus is made of
the running interpreter's standard library, so a different Python version gives a (slightly) different tokenizer;
``build_info.json`` records the version used. Training on the same documents always gives the same file.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import tokenizers

from .corpus import corpus_digest, corpus_stats
from .loader import DataConfig, load_corpus
from .tokenizer import DEFAULT_TOKENIZER_DIR, DEFAULT_VOCAB_SIZE, Tokenizer, train_tokenizer


def build(cfg: DataConfig | None = None) -> tuple[Tokenizer, dict, float]:
    """Train the default tokenizer from ``cfg`` (default ``DataConfig()``); return it, its build info, seconds."""
    cfg = cfg or DataConfig()
    t0 = time.perf_counter()
    docs = load_corpus(cfg)
    tok = train_tokenizer(docs, vocab_size=cfg.vocab_size, seed=cfg.seed)
    info = {
        "vocab_size": tok.vocab_size,
        "fingerprint": tok.fingerprint(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "tokenizers": tokenizers.__version__,
        "corpus": {
            k: v
            for k, v in cfg.to_dict().items()
            if k in ("corpus", "seed", "max_chars_per_domain", "val_fraction", "domains")
        },
        "train_documents": corpus_stats([d for d in docs if d.split == "train"]),
        "train_corpus_sha256": corpus_digest(docs, "train"),
    }
    return tok, info, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv3lab.data.build_tokenizer", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_TOKENIZER_DIR, help="folder (default: data/tokenizer)")
    parser.add_argument("--check", action="store_true", help="compare with the tokenizer in --out instead of writing")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args(argv)
    tok, info, seconds = build(DataConfig(vocab_size=args.vocab_size))
    if args.check:
        old = Tokenizer.load(args.out)
        same = old.fingerprint() == tok.fingerprint()
        print(
            f"{'same' if same else 'DIFFERENT'}: committed {old.fingerprint()} vs rebuilt {tok.fingerprint()} "
            f"({info['python']})"
        )
        return 0 if same else 1
    tok.save(args.out)
    (args.out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(
        f"wrote {args.out / 'tokenizer.json'}: vocab {tok.vocab_size}, fingerprint {tok.fingerprint()}, {seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
