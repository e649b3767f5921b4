"""The offline multi-domain data pipeline of §4.1: corpus → byte-level BPE → FIM (PSM) → packing → batches.

    from dsv3lab.data import DataConfig, make_datasets
    ds = make_datasets(DataConfig())            # built once (seconds), then loaded from data/cache/
    tokens, targets = ds.batch(step, batch_size)  # [B, T] each; a pure function of (seed, step, batch_size)
    ds.val["prose"]                             # [n, T+1] rows packed from prose validation documents only

Modules: ``corpus`` (documents, domains, split), ``math_problems`` (the generated math domain), ``tokenizer``
(byte-level BPE with special tokens), ``packing`` (FIM and packing), ``loader`` (config, cache, batches),
``build_tokenizer`` (regenerates the committed tokenizer). Notebook: 06_pretraining.
"""

from .corpus import DOMAINS, Document, builtin_corpus, corpus_stats, documents_table, folder_corpus
from .loader import DEFAULT_CACHE_DIR, DataConfig, Datasets, load_corpus, make_datasets
from .math_problems import MathProblem, math_problem
from .packing import apply_fim, is_fim, pack, undo_fim
from .tokenizer import SPECIAL_TOKENS, Tokenizer, default_tokenizer, train_tokenizer

__all__ = [
    "DOMAINS",
    "Document",
    "builtin_corpus",
    "corpus_stats",
    "documents_table",
    "folder_corpus",
    "DEFAULT_CACHE_DIR",
    "DataConfig",
    "Datasets",
    "load_corpus",
    "make_datasets",
    "MathProblem",
    "math_problem",
    "apply_fim",
    "is_fim",
    "pack",
    "undo_fim",
    "SPECIAL_TOKENS",
    "Tokenizer",
    "default_tokenizer",
    "train_tokenizer",
]
