"""The offline multi-domain corpus: documents labelled ``code``, ``prose`` or ``math``, split train/val by document.

DeepSeek-V3 pre-trains on 14.8T tokens of a multi-domain corpus with more mathematics and programming than V2 (§4.1).
Nothing may be downloaded here, so the built-in corpus is made from what every Python install carries plus a generator:

* ``code``  — the running interpreter's standard-library ``.py`` sources (``sysconfig.get_paths()["stdlib"]``), one
  document per file. Skipped: test suites (``test``/``tests``/``idle_test`` folders, ``test_*.py``), ``site-packages``,
  the ``encodings`` codec tables, ``pydoc_data`` (it is prose) and files over 100,000 characters (data tables).
* ``prose`` — English: the documentation topics bundled with Python (``pydoc_data.topics.topics``, one document per
  topic) and the docstrings of the same stdlib files (one document per module: its module docstring, then every class
  and function docstring under its qualified name).
* ``math``  — seeded generated problems with worked answers (:mod:`dsv3lab.data.math_problems`), one per document.

The corpus therefore depends on the Python version (its stdlib); the committed tokenizer was built with CPython 3.11.

**Split.** Deterministic and by document: a document is in ``val`` when ``blake2b(f"{seed}:{key}")`` maps below
``val_fraction``; ``key`` is the stdlib file a document comes from (so a module's code and its docstrings share a
split and validation prose never appears in training code), the topic name, or the problem index. A domain with at
least two documents always gets at least one of each split (the document with the smallest hash moves to ``val``).

**Caps.** ``max_chars_per_domain`` keeps whole documents, visited in a seeded order, while they fit. Exact duplicate
texts are dropped (small math templates repeat), so no text is in both splits.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import os
import sysconfig
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics

import pandas as pd

from .math_problems import math_problem

DOMAINS = ("code", "prose", "math")
SPLITS = ("train", "val")
MAX_FILE_CHARS = 100_000  # larger stdlib files are generated tables, not code anyone writes
FOLDER_CHUNK_CHARS = 50_000  # user files are cut at line breaks into documents of about this size
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data"}


@dataclass(frozen=True)
class Document:
    text: str
    domain: str  # "code" | "prose" | "math" for the built-in corpus; any label for user corpora
    source: str  # a stable id: "stdlib:json/decoder.py", "stdlib-docs:json/decoder.py", "pydoc:assert", "math:0:17"
    split: str  # "train" | "val"


# ---------------------------------------------------------------------------------------------- split and caps
def hash_unit(key: str, seed: int) -> float:
    """A uniform number in [0, 1) from ``key`` and ``seed``: stable across processes, platforms and versions."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def assign_splits(items: list[tuple[str, str, str, str]], val_fraction: float, seed: int) -> list[Document]:
    """``items`` = (text, domain, source, split key) → Documents, split by the hash of the key (see module doc)."""
    _check_fraction(val_fraction)
    units = [hash_unit(key, seed) for _, _, _, key in items]
    splits = ["val" if u < val_fraction else "train" for u in units]
    if val_fraction > 0:
        for domain in dict.fromkeys(d for _, d, _, _ in items):
            idx = [i for i, it in enumerate(items) if it[1] == domain]
            if len(idx) >= 2 and all(splits[i] == "train" for i in idx):
                splits[min(idx, key=lambda i: units[i])] = "val"
            if len(idx) >= 2 and all(splits[i] == "val" for i in idx):
                splits[max(idx, key=lambda i: units[i])] = "train"
    return [Document(text, dom, src, sp) for (text, dom, src, _), sp in zip(items, splits)]


def _capped(
    candidates: Iterable[tuple[str, Callable[[], list[tuple[str, str]]]]], max_chars: int | None, seed: int
) -> list[tuple[str, str, str]]:
    """Visit (key, loader) candidates in a seeded order; loader() -> [(source, text)]; keep whole texts that fit."""
    out, total, seen = [], 0, set()
    for key, load in sorted(candidates, key=lambda c: hash_unit("order:" + c[0], seed)):
        if max_chars is not None and max_chars - total < 200:
            break
        for source, text in load():
            if text not in seen and (max_chars is None or total + len(text) <= max_chars):
                out.append((source, text, key))
                seen.add(text)
                total += len(text)
    return out


# ---------------------------------------------------------------------------------------------- stdlib
def stdlib_files() -> list[tuple[str, Path]]:
    """(relative posix path, path) of the standard-library sources used for ``code`` and docstring ``prose``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                path = Path(dirpath) / name
                files.append((path.relative_to(root).as_posix(), path))
    return sorted(files)


def _read_source(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return text if text.strip() and len(text) <= MAX_FILE_CHARS else None


def module_docstrings(source: str, module: str) -> str:
    """The module docstring, then every class/function docstring under its qualified name, as one prose text."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"{module}\n\n{doc}")

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                d = ast.get_docstring(child)
                if d:
                    parts.append(f"{name}\n\n{d}")
                visit(child, name)

    visit(tree, module)
    return "\n\n".join(parts)


def _module_name(rel: str) -> str:
    name = rel[:-3].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _code_candidates() -> list[tuple[str, Callable[[], list[tuple[str, str]]]]]:
    def loader(rel: str, path: Path) -> Callable[[], list[tuple[str, str]]]:
        return lambda: [(f"stdlib:{rel}", t)] if (t := _read_source(path)) else []

    return [(rel, loader(rel, path)) for rel, path in stdlib_files()]


def _prose_candidates() -> list[tuple[str, Callable[[], list[tuple[str, str]]]]]:
    def topic(name: str) -> Callable[[], list[tuple[str, str]]]:
        return lambda: [(f"pydoc:{name}", topics[name])] if topics[name].strip() else []

    def docstrings(rel: str, path: Path) -> Callable[[], list[tuple[str, str]]]:
        def load() -> list[tuple[str, str]]:
            src = _read_source(path)
            text = module_docstrings(src, _module_name(rel)) if src else ""
            return [(f"stdlib-docs:{rel}", text)] if text.strip() else []

        return load

    cands = [(f"pydoc:{name}", topic(name)) for name in sorted(topics)]
    return cands + [(rel, docstrings(rel, path)) for rel, path in stdlib_files()]


def _math_items(max_chars: int | None, seed: int) -> list[tuple[str, str, str]]:
    if max_chars is None:
        raise ValueError(
            "max_chars_per_domain=None is only allowed without the generated 'math' domain "
            "(it is endless); give a number of characters"
        )
    out, total, seen = [], 0, set()
    for i in itertools.count():
        text = math_problem(seed, i).text
        if total + len(text) > max_chars:
            return out
        if text not in seen:  # exact repeats (small templates) are dropped: no problem is in both splits
            out.append((f"math:{seed}:{i}", text, f"math:{i}"))
            seen.add(text)
            total += len(text)
    raise AssertionError("unreachable")


def builtin_corpus(
    seed: int = 0,
    max_chars_per_domain: int | None = 2_000_000,
    val_fraction: float = 0.05,
    domains: Iterable[str] = DOMAINS,
) -> list[Document]:
    """The built-in corpus (see the module docstring): ``code``, ``prose`` and ``math`` documents, split by document.

    Args:
        seed: selects which documents fit under the cap, the split, and the math problems.
        max_chars_per_domain: characters per domain (whole documents); None = everything (not allowed with math).
        val_fraction: expected share of documents in ``val``.
        domains: a subset of ``DOMAINS``.
    """
    domains = tuple(domains)
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains:
        raise ValueError(f"unknown domain(s) {unknown or domains!r}; the built-in domains are {DOMAINS}")
    if max_chars_per_domain is not None and max_chars_per_domain < 1000:
        raise ValueError(f"max_chars_per_domain must be None or >= 1000, got {max_chars_per_domain}")
    _check_fraction(val_fraction)
    items: list[tuple[str, str, str, str]] = []
    for domain in DOMAINS:
        if domain not in domains:
            continue
        if domain == "code":
            got = _capped(_code_candidates(), max_chars_per_domain, seed)
        elif domain == "prose":
            got = _capped(_prose_candidates(), max_chars_per_domain, seed)
        else:
            got = _math_items(max_chars_per_domain, seed)
        items += [(text, domain, source, key) for source, text, key in got]
    return assign_splits(items, val_fraction, seed)


# ---------------------------------------------------------------------------------------------- user corpora
def _read_text_file(path: Path) -> tuple[str | None, str]:
    """(text, "") for a non-empty UTF-8 text file, else (None, reason): "binary" (a NUL byte, or not UTF-8) or
    "empty". The caller warns about every file it skips."""
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        return None, "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "binary"
    return (text, "") if text.strip() else (None, "empty")


def chunk_text(text: str, max_chars: int = FOLDER_CHUNK_CHARS) -> list[str]:
    """Cut ``text`` at line breaks into pieces of at most about ``max_chars`` (a longer single line stays whole);
    ``"".join(chunk_text(t)) == t``."""
    if len(text) <= max_chars:
        return [text]
    out, start = [], 0
    while start < len(text):
        end = start + max_chars
        if end < len(text):
            cut = text.rfind("\n", start + 1, end)
            end = cut + 1 if cut != -1 else (text.find("\n", end) + 1 or len(text))
        out.append(text[start:end])
        start = end
    return out


def folder_corpus(
    path: str | os.PathLike,
    domain: str = "user",
    val_fraction: float = 0.05,
    seed: int = 0,
    max_chars: int | None = None,
) -> list[Document]:
    """Every UTF-8 text file under ``path`` (recursively, hidden entries skipped) as documents labelled ``domain``.

    Files over ``FOLDER_CHUNK_CHARS`` are cut at line breaks into several documents (``source`` = ``relpath#k``), so
    one long file still yields a validation split. A folder written by ``datasets.Dataset.save_to_disk`` is read with
    the ``datasets`` package when it is installed (its ``text`` column). Raises ``FileNotFoundError`` for a missing
    folder and ``ValueError`` for a folder without any text.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(
            f"corpus folder {str(root)!r} does not exist; corpus must be 'builtin' or an existing "
            "folder of UTF-8 text files"
        )
    if not root.is_dir():
        raise ValueError(f"corpus {str(root)!r} is a file; corpus must be 'builtin' or a folder of UTF-8 text files")
    if not domain or not isinstance(domain, str):
        raise ValueError(f"domain must be a non-empty string, got {domain!r}")
    _check_fraction(val_fraction)
    if (root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists():
        texts = [(f"hf:{root.name}#{i}", t) for i, t in enumerate(_hf_dataset_texts(root)) if t.strip()]
        if not texts:
            raise ValueError(f"the saved dataset at {str(root)!r} has no non-empty 'text' rows")
        items = [(t, domain, src, src) for src, t in texts]
        return assign_splits(_cap_items(items, max_chars), val_fraction, seed)
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise ValueError(f"corpus folder {str(root)!r} is empty; it must hold UTF-8 text files (any extension)")
    items, rejected = [], {"binary": 0, "empty": 0}
    skipped: list[str] = []
    for p in files:
        text, why = _read_text_file(p)
        if text is None:
            rejected[why] += 1
            skipped.append(f"{p.relative_to(root).as_posix()} ({why})")
            continue
        rel = p.relative_to(root).as_posix()
        chunks = chunk_text(text)
        for k, chunk in enumerate(chunks):
            src = f"{rel}#{k}" if len(chunks) > 1 else rel
            items.append((chunk, domain, f"folder:{src}", src))
    if skipped and items:  # never silently: the files left out are named
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        warnings.warn(
            f"corpus folder {str(root)!r}: skipped {len(skipped)} file(s), not UTF-8 text or empty: {shown}",
            stacklevel=2,
        )
    if not items:
        raise ValueError(
            f"corpus folder {str(root)!r} has {len(files)} file(s) but no text: {rejected['binary']} "
            f"binary, {rejected['empty']} empty; it must hold non-empty UTF-8 text files"
        )
    return assign_splits(_cap_items(items, max_chars), val_fraction, seed)


def _cap_items(items: list[tuple[str, str, str, str]], max_chars: int | None) -> list[tuple[str, str, str, str]]:
    """Drop exact duplicates, then keep whole documents in order while they fit under ``max_chars``."""
    out, total, seen = [], 0, set()
    for it in items:
        if it[0] not in seen and (max_chars is None or total + len(it[0]) <= max_chars):
            out.append(it)
            seen.add(it[0])
            total += len(it[0])
    if not out:
        raise ValueError(f"max_chars={max_chars} is smaller than every document of the corpus")
    return out


def _hf_dataset_texts(root: Path) -> list[str]:
    try:
        import datasets  # optional: not a dependency of dsv3lab
    except ImportError:
        raise ValueError(
            f"{str(root)!r} is a saved Hugging Face dataset; reading it needs the optional `datasets` "
            "package (pip install datasets), or give a folder of text files"
        ) from None
    ds = datasets.load_from_disk(str(root))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if "text" not in ds.column_names:
        raise ValueError(f"the saved dataset at {str(root)!r} has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if isinstance(t, str)]


def corpus_digest(docs: list[Document], split: str | None = "train") -> str:
    """SHA-256 of the documents (source and text, in order) of ``split`` (None = all): a corpus identity that is
    recorded with the committed tokenizer and with every built data set."""
    h = hashlib.sha256()
    for d in docs:
        if split is None or d.split == split:
            h.update(f"{d.domain}\0{d.source}\0{d.text}\0".encode())
    return h.hexdigest()


def corpus_stats(docs: list[Document]) -> dict[str, dict[str, int]]:
    """{domain: {"train_docs", "val_docs", "train_chars", "val_chars"}}."""
    out: dict[str, dict[str, int]] = {}
    for d in docs:
        s = out.setdefault(d.domain, {"train_docs": 0, "val_docs": 0, "train_chars": 0, "val_chars": 0})
        s[f"{d.split}_docs"] += 1
        s[f"{d.split}_chars"] += len(d.text)
    return out


def documents_table(docs: list[Document], tokenizer=None):
    """A pandas DataFrame, one row per document: source, domain, split, chars (and tokens with a ``tokenizer``)."""
    table = pd.DataFrame(
        {
            "source": [d.source for d in docs],
            "domain": [d.domain for d in docs],
            "split": [d.split for d in docs],
            "chars": [len(d.text) for d in docs],
        }
    )
    if tokenizer is not None:
        table["tokens"] = [len(x) for x in tokenizer.encode_batch([d.text for d in docs])]
    return table
