"""Data pipeline speed: build from scratch, load from the cache, batches/s, against one toy-model training step.

    python benchmarks/data_pipeline.py [--small] [--threads 2]

Prints JSON. The build uses a fresh temporary cache folder and the committed tokenizer (as CI's first call does).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

import dsv3lab
from dsv3lab.data import DataConfig, make_datasets
from dsv3lab.reproduce import machine_description


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="DataConfig.small() instead of DataConfig()")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = DataConfig.small() if args.small else DataConfig()
    out: dict = {"config": cfg.to_dict(), "machine": machine_description(), "versions": dsv3lab.versions()}
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        ds = make_datasets(cfg, cache_dir=cache)
        out["build_seconds"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        make_datasets(cfg, cache_dir=cache)
        out["cached_seconds"] = round(time.perf_counter() - t0, 3)
    n = ds.num_tokens()
    out["train_tokens"] = n["train"]
    out["train_tokens_by_domain"] = {d: s["train_tokens"] for d, s in n["by_domain"].items()}
    out["val_rows"] = {d: len(v) for d, v in ds.val.items()}
    model = dsv3lab.build_model(dsv3lab.ModelConfig.preset("toy"), seed=0)
    out["batches_per_second"] = {}
    for batch_size in (8, 32):
        t0 = time.perf_counter()
        for step in range(1000):
            ds.batch(step, batch_size)
        out["batches_per_second"][f"B={batch_size}"] = round(1000 / (time.perf_counter() - t0))
    x, y = ds.batch(0, 8)
    times = []
    for _ in range(3):  # the first is a warm-up
        t0 = time.perf_counter()
        model(x, y)[1]["total"].backward()
        times.append(time.perf_counter() - t0)
    out["toy_model_train_step_ms_B=8"] = round(1e3 * min(times[1:]), 1)
    out["seq_len"] = cfg.seq_len
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
