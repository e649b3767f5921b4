"""The default data configuration end to end: built from scratch, reloaded from the cache, and made from the same
corpus as the committed tokenizer (so ``python -m dsv3lab.data.build_tokenizer`` reproduces it). The build time is
printed, not asserted (a shared CI machine's speed varies); ``python benchmarks/data_pipeline.py`` measures it."""

import json
import platform
import time

import pytest

from dsv3lab.data import DOMAINS, DataConfig, default_tokenizer, make_datasets
from dsv3lab.data.tokenizer import DEFAULT_TOKENIZER_DIR


@pytest.mark.slow
def test_default_config_builds_and_caches_from_the_committed_tokenizers_corpus(tmp_path):
    t0 = time.perf_counter()
    ds = make_datasets(DataConfig(), cache_dir=tmp_path)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = make_datasets(DataConfig(), cache_dir=tmp_path)
    cached_s = time.perf_counter() - t0
    n = ds.num_tokens()
    print(
        f"\nDataConfig(): built in {build_s:.1f}s, cached {cached_s:.2f}s; train tokens {n['train']:,} "
        f"({ {d: n['by_domain'][d]['train_tokens'] for d in DOMAINS} }), val rows {n['val']}"
    )
    assert again.stats["from_cache"] and not ds.stats["from_cache"]
    total = n["train"]
    assert 1_000_000 < total < 4_000_000  # "a few million tokens at most"
    for d in DOMAINS:  # every domain well represented, and a full validation set
        assert n["by_domain"][d]["train_tokens"] > 0.2 * total and len(ds.val[d]) == 32
    assert ds.tokenizer.fingerprint() == default_tokenizer().fingerprint()

    info = json.loads((DEFAULT_TOKENIZER_DIR / "build_info.json").read_text())
    here = f"{platform.python_implementation()} {platform.python_version()}"
    if here != info["python"]:
        pytest.skip(f"the corpus depends on the stdlib: the tokenizer was built with {info['python']}, this is {here}")
    assert ds.stats["train_corpus_sha256"] == info["train_corpus_sha256"], (
        "the default corpus changed: rebuild the tokenizer with `python -m dsv3lab.data.build_tokenizer`"
    )
