"""The data pipeline (§4.1): corpus, split, math answers, tokenizer, FIM, packing, batches, cache, errors."""

import ast
import dataclasses
import math
import random
import re
import statistics
import time
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import torch

from dsv3lab.data import (
    DOMAINS,
    DataConfig,
    Tokenizer,
    apply_fim,
    builtin_corpus,
    default_tokenizer,
    folder_corpus,
    is_fim,
    load_corpus,
    make_datasets,
    math_problem,
    pack,
    train_tokenizer,
    undo_fim,
)
from dsv3lab.data.corpus import chunk_text, hash_unit

SEQ_LEN = 64


@pytest.fixture(scope="module")
def cfg():
    return DataConfig.small(seq_len=SEQ_LEN)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="module")
def built(cfg, cache_dir):
    """The small config built from scratch (committed tokenizer), with its build time."""
    t0 = time.perf_counter()
    ds = make_datasets(cfg, cache_dir=cache_dir)
    return ds, time.perf_counter() - t0


@pytest.fixture(scope="module")
def ds(built):
    return built[0]


@pytest.fixture(scope="module")
def docs(cfg):
    return load_corpus(cfg)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


# ---------------------------------------------------------------------------------------------- corpus
def test_domains_are_labelled_and_look_like_their_domain(docs):
    by = {d: [doc for doc in docs if doc.domain == d] for d in DOMAINS}
    assert all(len(v) > 0 for v in by.values()) and {doc.domain for doc in docs} == set(DOMAINS)
    for doc in by["code"]:
        assert doc.source.startswith("stdlib:") and doc.source.endswith(".py")
        assert "/test/" not in doc.source and "/test_" not in doc.source
        ast.parse(doc.text)  # real Python source
    assert all(doc.source.startswith(("pydoc:", "stdlib-docs:")) for doc in by["prose"])
    words = re.findall(r"[a-z]+", " ".join(doc.text for doc in by["prose"]).lower())
    assert Counter(words)["the"] / len(words) > 0.03  # English: "the" is ~4-6% of words
    assert all(doc.text.startswith("Problem: ") and "\nAnswer: " in doc.text for doc in by["math"])
    for d in DOMAINS:  # the cap holds, and is nearly filled
        chars = sum(len(doc.text) for doc in by[d])
        assert 0.8 * 200_000 < chars <= 200_000, (d, chars)


def test_split_is_deterministic_and_by_document(docs, cfg):
    again = load_corpus(cfg)
    assert [(d.source, d.split) for d in docs] == [(d.source, d.split) for d in again]
    sources = [d.source for d in docs]
    assert len(sources) == len(set(sources))  # each document once, so in exactly one split
    splits = {d.source: d.split for d in docs}
    for s in DOMAINS:
        assert {"train", "val"} <= {d.split for d in docs if d.domain == s}
    math_docs = [d for d in docs if d.domain == "math"]
    assert 0.03 < sum(d.split == "val" for d in math_docs) / len(math_docs) < 0.07
    for d in math_docs:  # the rule itself: hash of the key and the seed
        assert d.split == ("val" if hash_unit(f"math:{d.source.split(':')[2]}", cfg.seed) < 0.05 else "train")
    for src, split in splits.items():  # a module's docstrings share the split of its code
        if src.startswith("stdlib-docs:") and "stdlib:" + src.split(":", 1)[1] in splits:
            assert split == splits["stdlib:" + src.split(":", 1)[1]]
    other = builtin_corpus(seed=1, max_chars_per_domain=20_000)
    assert [d.text for d in other if d.domain == "math"][:5] != [d.text for d in docs if d.domain == "math"][:5]


def _linear_eval(expr: str, **values):
    expr = re.sub(r"(\d)([xy])", r"\1*\2", expr.replace("^", "**"))
    return eval(expr, {}, {k: Fraction(v) for k, v in values.items()})


def _check_math(p) -> None:
    q, a = p.question, p.answer
    nums = [int(n) for n in re.findall(r"-?\d+", q)]
    if p.kind == "arithmetic":
        assert int(a) == eval(q[len("Compute ") : -1].replace("×", "*"))
    elif p.kind == "division":
        n, d = nums
        assert a == f"quotient {n // d}, remainder {n % d}"
    elif p.kind == "fractions":
        x, op, y = re.match(r"Compute (\S+) (\S) (\S+) and", q).groups()
        x, y = Fraction(x), Fraction(y)
        assert Fraction(a) == {"+": x + y, "-": x - y, "×": x * y, "÷": x / y}[op]
    elif p.kind == "percent":
        assert Fraction(a) == Fraction(nums[0] * nums[1], 100)
    elif p.kind == "discount":
        assert Fraction(a.strip("$")) == nums[0] * (1 - Fraction(nums[1], 100))
    elif p.kind == "linear":
        lhs, rhs = q[len("Solve for x: ") : -1].split(" = ")
        x = int(a.split("= ")[1])
        assert _linear_eval(lhs, x=x) == _linear_eval(rhs, x=x)
        assert _linear_eval(lhs, x=1) - _linear_eval(rhs, x=1) != _linear_eval(lhs, x=0) - _linear_eval(rhs, x=0)
    elif p.kind == "system":
        x, y = (int(v) for v in re.findall(r"-?\d+", a))
        for eq in q[len("Solve the system: ") : -1].split(" and "):
            lhs, rhs = eq.split(" = ")
            assert _linear_eval(lhs, x=x, y=y) == int(rhs)
    elif p.kind == "quadratic":
        f = lambda x: _linear_eval(q[len("Solve ") : -len(" = 0.")], x=x)
        c, b = f(0), f(1) - 1 - f(0)
        disc = b * b - 4 * c
        r = math.isqrt(int(disc))
        assert r * r == disc
        assert {Fraction(v) for v in re.findall(r"-?\d+", a)} == {(-b - r) / 2, (-b + r) / 2}
    elif p.kind == "gcd_lcm":
        x, y = nums
        assert a == f"gcd {math.gcd(x, y)}, lcm {x * y // math.gcd(x, y)}"
    elif p.kind == "power":
        assert int(a) == nums[0] ** nums[1]
    elif p.kind == "sqrt":
        assert int(a) ** 2 == nums[0]
    elif p.kind == "mean_median":
        mean, median = re.match(r"mean (\S+), median (\S+)", a).groups()
        assert Fraction(mean) == statistics.mean(map(Fraction, nums))
        assert Fraction(median) == statistics.median(map(Fraction, nums))
    elif p.kind == "word_shopping":
        n, price, paid = nums
        assert a == f"${paid - n * price}" and paid > n * price
    elif p.kind == "word_travel":
        assert a == f"{nums[0] * nums[1]} km"
    elif p.kind == "word_work":
        x, y = nums
        assert Fraction(a.split()[0]) == 1 / (Fraction(1, x) + Fraction(1, y))
    elif p.kind == "word_ages":
        k, later, total = nums
        assert int(a) == (total - 2 * later) / (k + 1)
    elif p.kind == "word_sharing":
        total, x, y = nums
        assert int(a) == total * x // (x + y)
    else:
        raise AssertionError(f"unchecked kind {p.kind}")


def test_math_answers_are_correct_for_every_template():
    kinds = Counter()
    for i in range(3000):
        p = math_problem(7, i)
        _check_math(p)
        kinds[p.kind] += 1
        assert math_problem(7, i) == p  # a pure function of (seed, index)
    assert len(kinds) == 17 and min(kinds.values()) > 30, kinds


# ---------------------------------------------------------------------------------------------- tokenizer
def test_default_tokenizer_specials_and_model_defaults(tok):
    from dsv3lab import ModelConfig

    assert tok.vocab_size == 8192
    ids = [tok.bos_id, tok.eos_id, tok.pad_id, tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id]
    assert ids == list(range(6))
    cfg = ModelConfig.preset("toy")
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.vocab_size) == (tok.bos_id, tok.eos_id, tok.vocab_size)


@pytest.mark.parametrize("domain", DOMAINS)
def test_encode_decode_round_trip(tok, docs, domain):
    texts = [d.text for d in docs if d.domain == domain][:40]
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert tok.decode(ids) == text
        assert not set(ids) & tok.special_ids
        assert ids == tok.encode(text)


def test_unusual_text_and_literal_special_strings_round_trip(tok):
    text = "naïve café 🚀 — ∑x² ½\t\r\n  <|end_of_sentence|><|fim_begin|>\x00 \u200b"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and not set(ids) & tok.special_ids  # literal strings are not special ids
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == "<|begin_of_sentence|>" + text + "<|end_of_sentence|>"


def test_tokenizer_save_load_round_trip(tmp_path, tok):
    small = train_tokenizer(["def f(x):\n    return x + 1\n" * 50, "The cat sat on the mat. " * 80], vocab_size=300)
    small.save(tmp_path / "tk")
    for where in (tmp_path / "tk", tmp_path / "tk" / "tokenizer.json"):
        back = Tokenizer.load(where)
        assert back.fingerprint() == small.fingerprint() and back.vocab_size == small.vocab_size <= 300
        assert back.encode("return the cat") == small.encode("return the cat")
    assert (tmp_path / "tk" / "special_tokens.json").exists()
    tok.save(tmp_path / "default")
    assert Tokenizer.load(tmp_path / "default").fingerprint() == tok.fingerprint()


def test_tokenizer_training_is_deterministic(docs):
    some = [d for d in docs if d.split == "train"][::4]
    a, b = train_tokenizer(some, vocab_size=600), train_tokenizer(list(reversed(some)), vocab_size=600)
    assert a.vocab_size == 600 and a.fingerprint() == b.fingerprint()  # order of documents does not matter
    assert [a.token(i) for i in range(6)] == [
        "<|begin_of_sentence|>",
        "<|end_of_sentence|>",
        "<|pad|>",
        "<|fim_begin|>",
        "<|fim_hole|>",
        "<|fim_end|>",
    ]


# ---------------------------------------------------------------------------------------------- FIM and packing
class _Draws:
    def __init__(self, values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def test_fim_psm_layout_by_hand(tok):
    ids = list(range(100, 110))  # n = 10: cut points int(0.25 * 11) = 2 and int(0.75 * 11) = 8
    out = apply_fim(ids, tok, _Draws([0.05, 0.75, 0.25]), rate=0.1)
    P, S, M = tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id
    assert out == [tok.bos_id, P, 100, 101, S, 108, 109, M, *range(102, 108), tok.eos_id]
    assert apply_fim(ids, tok, _Draws([0.15]), rate=0.1) == [tok.bos_id, *ids, tok.eos_id]
    assert undo_fim(out, tok) == ids


def test_fim_round_trip_reconstructs_documents(tok, docs):
    rng = random.Random(0)
    texts = [d.text for d in docs][::7]
    for text, ids in zip(texts, tok.encode_batch(texts)):
        out = apply_fim(ids, tok, rng, rate=1.0)
        assert is_fim(out, tok) and len(out) == len(ids) + 5
        assert Counter(x for x in out if x not in tok.special_ids) == Counter(ids)
        assert tok.decode(undo_fim(out, tok)) == text
    assert undo_fim(apply_fim([], tok, rng, rate=1.0), tok) == []


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 1.0])
def test_fim_rate_matches(tok, rate):
    n = 4000
    for rng in (random.Random(1), np.random.default_rng(1)):
        hits = sum(is_fim(apply_fim([7, 8, 9], tok, rng, rate), tok) for _ in range(n))
        assert abs(hits / n - rate) <= 4 * math.sqrt(rate * (1 - rate) / n) + 1e-9, (rate, hits)


def test_pack_preserves_every_token():
    g = random.Random(0)
    docs = [[g.randrange(6, 500) for _ in range(g.randrange(0, 90))] for _ in range(200)]
    stream = [t for d in docs for t in d]
    for seq_len in (2, 7, 64):
        rows = pack(docs, seq_len)
        assert rows.dtype == torch.long and rows.shape == (len(stream) // (seq_len + 1), seq_len + 1)
        assert rows.flatten().tolist() == stream[: rows.numel()] and len(stream) - rows.numel() <= seq_len
        padded = pack(docs, seq_len, pad_id=2)
        flat = padded.flatten().tolist()
        assert flat[: len(stream)] == stream and set(flat[len(stream) :]) <= {2} and len(flat) - len(stream) <= seq_len


def test_training_rows_hold_the_training_documents(ds, docs, tok):
    """End to end: the non-special tokens of the packed rows are those of the training documents, less the tail."""
    train = [d.text for d in docs if d.split == "train"]
    want = Counter(t for ids in tok.encode_batch(train) for t in ids)
    got = Counter(t for t in ds.train.flatten().tolist() if t not in tok.special_ids)
    missing = want - got
    assert not got - want and sum(missing.values()) <= SEQ_LEN
    n_docs = len(train)
    assert n_docs - 3 <= (ds.train == tok.bos_id).sum() <= n_docs == ds.stats["train_docs"]
    assert abs(ds.stats["fim_docs"] / n_docs - 0.1) < 0.03
    for d in DOMAINS:  # per-token domain labels agree with the per-domain counts (FIM adds 3 tokens per document)
        assert abs(ds.num_tokens()["train_by_domain"][d] - ds.stats["by_domain"][d]["train_tokens"]) <= (
            3 * ds.stats["fim_docs"] + SEQ_LEN
        )


# ---------------------------------------------------------------------------------------------- Datasets
def test_val_rows_hold_only_their_domain(ds, docs, tok):
    assert set(ds.val) == set(DOMAINS)
    for d, rows in ds.val.items():
        assert rows.shape[1] == SEQ_LEN + 1 and 0 < len(rows) <= 8
        texts = {doc.text for doc in docs if doc.domain == d and doc.split == "val"}
        others = "\x00".join(doc.text for doc in docs if doc.domain != d or doc.split == "train")
        stream = rows.flatten().tolist()
        assert stream[0] == tok.bos_id
        pieces = [p.removeprefix("<|begin_of_sentence|>") for p in tok.decode(stream).split("<|end_of_sentence|>")]
        complete, last = pieces[:-1], pieces[-1].rstrip("\ufffd")  # the last one is cut by the row end
        assert all(c in texts for c in complete) and any(t.startswith(last) for t in texts)
        assert not any(c in others for c in complete) and (last in texts or last[:2000] not in others)
        assert tok.fim_prefix_id not in stream  # no FIM in validation


def test_batch_is_a_pure_function_of_step_and_resumes_exactly(ds, cfg, cache_dir):
    B = 16
    x, y = ds.batch(3, B)
    assert x.shape == y.shape == (B, SEQ_LEN) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    fresh = make_datasets(cfg, cache_dir=cache_dir)  # a "restarted" process: from the cache
    assert fresh.stats["from_cache"]
    for step in (0, 3, 1000):
        for a, b in zip(ds.batch(step, B), fresh.batch(step, B)):
            assert torch.equal(a, b)
    n = len(ds.train)
    steps = -(-2 * n // B)  # two epochs
    rows = np.concatenate([ds.batch_rows(s, B) for s in range(steps)])
    first, second = rows[:n], rows[n : 2 * n]
    assert sorted(first.tolist()) == list(range(n)) == sorted(second.tolist())  # every row once per epoch
    assert not np.array_equal(first, second)  # epochs reshuffle
    other = dataclasses.replace(ds, seed=1, _perms={})  # the order is keyed by the seed
    assert not torch.equal(other.batch(3, B)[0], x)


def test_cache_is_fast_and_keyed_by_config(built, cfg, cache_dir):
    ds, build_s = built
    t0 = time.perf_counter()
    again = make_datasets(cfg, cache_dir=cache_dir)
    load_s = time.perf_counter() - t0
    print(
        f"\nsmall config: build {build_s:.2f}s from scratch, {load_s:.3f}s from cache, {ds.num_tokens()['train']:,} "
        "training tokens"
    )
    assert again.stats["from_cache"] and not ds.stats["from_cache"]  # the time is printed, not asserted
    assert torch.equal(again.train, ds.train) and all(torch.equal(again.val[d], ds.val[d]) for d in DOMAINS)
    assert torch.equal(again.train_domains, ds.train_domains)
    tiny = dict(seq_len=SEQ_LEN, max_chars_per_domain=20_000, val_seqs_per_domain=1)
    a = make_datasets(DataConfig.small(**tiny), cache_dir=cache_dir)
    b = make_datasets(DataConfig.small(**tiny, fim_rate=0.0), cache_dir=cache_dir)
    assert a.stats["cache_file"] != b.stats["cache_file"] and a.stats["fim_docs"] > 0 == b.stats["fim_docs"]


def test_loader_is_not_the_bottleneck(ds):
    """batch() is an index op: it must cost a small fraction of even a bigram model's training step (embedding →
    head → cross-entropy → backward, 8192 × 128) on the same batch; any real model step costs more."""
    B = 16
    times = []
    for s in range(300):
        t0 = time.perf_counter()
        ds.batch(s, B)
        times.append(time.perf_counter() - t0)
    per_batch = statistics.median(times)
    emb, head = torch.nn.Embedding(ds.tokenizer.vocab_size, 128), torch.nn.Linear(128, ds.tokenizer.vocab_size)
    x, y = ds.batch(0, B)
    steps = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.nn.functional.cross_entropy(head(emb(x)).flatten(0, 1), y.flatten()).backward()
        steps.append(time.perf_counter() - t0)
    step = statistics.median(steps)
    print(
        f"\nbatch(): {1 / per_batch:,.0f} batches/s (B={B}, T={SEQ_LEN}); bigram step {step * 1e3:.1f} ms "
        f"= {step / per_batch:,.0f}x one batch"
    )
    assert per_batch < 0.1 * step


def test_other_vocab_size_trains_and_caches_a_tokenizer(tmp_path):
    cfg = DataConfig.small(vocab_size=512, seq_len=32, max_chars_per_domain=30_000, val_seqs_per_domain=2)
    ds = make_datasets(cfg, cache_dir=tmp_path)
    assert ds.tokenizer.vocab_size == 512 and int(ds.train.max()) < 512
    saved = list((tmp_path / "tokenizers").glob("*/tokenizer.json"))
    assert len(saved) == 1 and Tokenizer.load(saved[0]).fingerprint() == ds.tokenizer.fingerprint()
    assert make_datasets(cfg, cache_dir=tmp_path).stats["from_cache"]


# ---------------------------------------------------------------------------------------------- user corpora
def _write_folder(root, n=40):
    root.mkdir()
    (root / "sub").mkdir()
    for i in range(n):
        (root / ("sub" if i % 2 else ".") / f"f{i}.txt").write_text(math_problem(3, i).text * 3)
    (root / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (root / "empty.txt").write_text("  \n")
    (root / ".hidden.txt").write_text("secret")
    return root


def test_folder_corpus(tmp_path):
    root = _write_folder(tmp_path / "corpus")
    (root / "long.md").write_text("\n".join(f"line {i} " + "x" * 70 for i in range(1500)))  # > 50,000 chars
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\).*blob.bin \(binary\), empty.txt \(empty\)"):
        docs = folder_corpus(root, domain="notes")
    assert {d.domain for d in docs} == {"notes"} and {d.split for d in docs} == {"train", "val"}
    assert not any("blob" in d.source or "empty" in d.source or "hidden" in d.source for d in docs)
    long = [d for d in docs if d.source.startswith("folder:long.md#")]
    assert len(long) >= 3 and "".join(d.text for d in long) == (root / "long.md").read_text()
    assert "".join(chunk_text("a\nb\n" * 10, max_chars=5)) == "a\nb\n" * 10


def test_folder_make_datasets(tmp_path):
    root = _write_folder(tmp_path / "corpus", n=120)
    cfg = DataConfig(corpus=str(root), seq_len=16, val_seqs_per_domain=4, val_fraction=0.2)
    with pytest.warns(UserWarning, match="skipped 2 file"):  # the folder's binary and empty files, named
        ds = make_datasets(cfg, cache_dir=tmp_path / "cache")
    assert ds.domains == ["user"] and set(ds.val) == {"user"} and len(ds.val["user"]) == 4
    (root / "f0.txt").write_text("changed\n" * 50)  # a changed file is a new cache key
    with pytest.warns(UserWarning, match="skipped 2 file"):
        assert not make_datasets(cfg, cache_dir=tmp_path / "cache").stats["from_cache"]


def test_saved_hf_dataset_folder(tmp_path):
    import datasets  # a dev dependency, so the optional reader is always tested

    datasets.Dataset.from_dict({"text": [math_problem(0, i).text for i in range(50)]}).save_to_disk(tmp_path / "hf")
    docs = folder_corpus(tmp_path / "hf")
    assert len(docs) == 50 and docs[0].source.startswith("hf:")


# ---------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors(tmp_path, tok, ds):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_datasets(DataConfig(corpus=str(tmp_path / "nope")), cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty; it must hold UTF-8 text files"):
        make_datasets(DataConfig(corpus=str(tmp_path / "empty")), cache_dir=tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.png").write_bytes(b"\x89PNG\x00\x01" * 100)
    (tmp_path / "bin" / "b.dat").write_bytes(b"\xff\xfe\xfa" * 10)
    (tmp_path / "bin" / "c.txt").write_text("")
    with pytest.raises(ValueError, match=r"3 file\(s\) but no text: 2 binary, 1 empty"):
        folder_corpus(tmp_path / "bin")
    (tmp_path / "one.txt").write_text("hello")
    with pytest.raises(ValueError, match="is a file"):
        folder_corpus(tmp_path / "one.txt")
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['poetry'\]; the built-in corpus has"):
        DataConfig(domains=("code", "poetry"))
    with pytest.raises(ValueError, match="unknown domain"):
        builtin_corpus(domains=["poetry"])
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        DataConfig(seq_len=1)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        pack([[1, 2, 3]], 1)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"fim_rate must be a number in \[0, 1\]"):
            DataConfig(fim_rate=bad)
        with pytest.raises(ValueError, match=r"fim_rate must be a number in \[0, 1\]"):
            apply_fim([1], tok, random.Random(0), rate=bad)
    with pytest.raises(ValueError, match=r"vocab_size must be an integer >= 262 \(256 byte symbols \+ 6 special"):
        DataConfig(vocab_size=261)
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 262"):
        train_tokenizer(["abc"], vocab_size=100)
    tok.save(tmp_path / "default")
    with pytest.raises(ValueError, match="the tokenizer has 8192 entries but vocab_size=4096"):
        make_datasets(DataConfig.small(vocab_size=4096, tokenizer=str(tmp_path / "default")), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        DataConfig(val_fraction=0.0)
    with pytest.raises(ValueError, match="not allowed with the built-in 'math' domain"):
        DataConfig(max_chars_per_domain=None)
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "a.txt").write_text("just one short document\n")
    with pytest.raises(ValueError, match="'user' has 0 validation document"):
        make_datasets(DataConfig(corpus=str(tmp_path / "single")), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown domain 'poetry'; validation domains"):
        next(ds.val_batches("poetry", 2))
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        ds.batch(-1, 4)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ds.batch(0, 0)


def test_domain_subset(tmp_path):
    cfg = DataConfig.small(domains=("math",), max_chars_per_domain=20_000, seq_len=32, val_seqs_per_domain=2)
    ds = make_datasets(cfg, cache_dir=tmp_path)
    assert ds.domains == ["math"] and list(ds.val) == ["math"] and set(ds.num_tokens()["by_domain"]) == {"math"}
    assert "Problem:" in ds.tokenizer.decode(ds.train[0])


# ---------------------------------------------------------------------------------------------- plots
def test_data_plots(ds, docs, tok):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsv3lab.data import documents_table
    from dsv3lab.viz import plot_doc_lengths, plot_fim_example, plot_packing, plot_tokens_per_domain
    from dsv3lab.viz.data import fim_parts

    out = apply_fim(list(range(100, 110)), tok, _Draws([0.0, 0.25, 0.75]), rate=0.1)
    assert [(label, len(p)) for label, p in fim_parts(out, tok)] == [
        ("special", 1),
        ("special", 1),
        ("prefix", 2),
        ("special", 1),
        ("suffix", 2),
        ("special", 1),
        ("middle", 6),
        ("special", 1),
    ]
    fig = plot_tokens_per_domain(ds.num_tokens())
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights[:3] == [ds.stats["by_domain"][d]["train_tokens"] for d in ds.domains]
    table = documents_table(docs[:50], tok)
    assert (table.tokens > 0).all() and set(table.columns) == {"source", "domain", "split", "chars", "tokens"}
    figs = [
        fig,
        plot_doc_lengths(table),
        plot_fim_example(out, tok),
        plot_packing(ds.train, ds.train_domains, ds.domains, tok.bos_id),
    ]
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figs)
    for f in figs:
        plt.close(f)
