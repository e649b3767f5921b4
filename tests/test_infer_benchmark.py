"""benchmarks/decode.py runs at a tiny size and reports the keys the README table is built from (not speed)."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")


def test_decode_benchmark_json_keys(capsys):
    path = Path(__file__).parent.parent / "benchmarks" / "decode.py"
    spec = importlib.util.spec_from_file_location("decode_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert (
        bench.main(["--preset", "tiny", "--contexts", "16", "--new-tokens", "3", "--repeats", "1", "--threads", "1"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert {"preset", "new_tokens", "repeats", "threads", "machine", "versions", "contexts"} <= set(out)
    row = out["contexts"]["16"]
    assert set(row["decode_tokens_per_s"]) == {"dsv3lab_absorb", "dsv3lab_naive", "transformers"}
    assert {"ratio_absorb_over_naive", "ratio_dsv3lab_over_transformers", "prefill_s", "runs_tokens_per_s"} <= set(row)
    assert row["same_tokens"] is True  # same weights, greedy: every method decodes the same tokens


def test_decode_benchmark_runs_in_bf16(capsys):
    path = Path(__file__).parent.parent / "benchmarks" / "decode.py"
    spec = importlib.util.spec_from_file_location("decode_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--preset", "tiny", "--contexts", "16", "--new-tokens", "3", "--repeats", "1", "--threads", "1"]
    assert bench.main(argv + ["--dtype", "bfloat16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dtype"] == "bfloat16" and all(v > 0 for v in out["contexts"]["16"]["decode_tokens_per_s"].values())
