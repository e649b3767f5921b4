"""The benchmark scripts run at a tiny size and print the JSON they promise (keys and sanity, not speed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def test_train_step_benchmark_json(tmp_path):
    pytest.importorskip("transformers")
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "train_step.py"),
        "--preset",
        "tiny",
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--profile",
        "--profile-top",
        "4",
        "--matmul-size",
        "256",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for key in (
        "command",
        "preset",
        "batch",
        "seq_len",
        "tokens_per_step",
        "results",
        "ratios",
        "machine",
        "versions",
        "memory_method",
        "note",
        "fastest_dsv3lab",
    ):
        assert key in report, key
    names = set(report["results"])
    assert {
        "dsv3lab[naive,loop]",
        "dsv3lab[naive,grouped]",
        "dsv3lab[absorb,loop]",
        "dsv3lab[absorb,grouped]",
        "transformers[sdpa,grouped_mm]",
        "transformers[sdpa,eager]",
        "dsv3lab[naive,grouped]+fused_loss",
    } <= names
    losses = set()
    for name, r in report["results"].items():
        assert r["tokens_per_s_min"] <= r["tokens_per_s"] <= r["tokens_per_s_max"], name
        assert len(r["step_s"]) == 2 and r["peak_mem_mb"] > 0 and r["cpu_s_per_step"] > 0, name
        assert r["parity_max_abs_diff"] <= 1e-4, name  # every variant computes the same function
        losses.add(round(r["loss"], 3))
    assert len(losses) == 1  # the same loss on the same weights and tokens
    for key in (
        "naive_grouped_vs_naive_loop",
        "naive_loop_vs_absorb_loop",
        "dsv3lab[naive,grouped]_vs_transformers_default",
        "dsv3lab[naive,loop]_vs_transformers_eager",
    ):
        assert report["ratios"][key] > 0, key
    assert set(report["ratios_by_cpu_time"]) == set(report["ratios"])
    flops = report["flops_per_step"]
    assert flops["total_gflop"] > 0 and all(v >= 0 for v in flops["share"].values())
    assert abs(sum(flops["share"].values()) - 1) < 0.01 and flops["share"]["output head"] > 0
    assert report["tokens_per_step"] == 32 and report["machine"]["torch_threads"] == 1
    roof = report["roofline"]
    assert roof["step_gflop"] == flops["total_gflop"] and set(roof["matmul_gflops"]) == {"float32", "bfloat16"}
    for name, r in report["results"].items():  # achieved = step FLOPs / median step time, fractions of the probes
        median_s = sorted(r["step_s"])[len(r["step_s"]) // 2] if len(r["step_s"]) % 2 else None
        assert r["achieved_gflops"] > 0 and r["fraction_of_bf16_matmul"] > 0, name
        if median_s:
            assert r["achieved_gflops"] == pytest.approx(flops["total_gflop"] / median_s, rel=0.05)
        frac = r["achieved_gflops"] / roof["matmul_gflops"]["float32"]
        assert r["fraction_of_fp32_matmul"] == pytest.approx(frac, abs=2e-3), name
    assert report["ratios"]["fast_vs_reference"] > 0 and report["compile"] is None
    profile = report["profile"]
    assert "dsv3lab[naive,loop]" in profile and "transformers[sdpa,grouped_mm]" in profile
    for ops in profile.values():
        assert len(ops) == 4 and ops[0]["self_cpu_ms"] >= ops[-1]["self_cpu_ms"] and ops[0]["calls"] >= 1
    # the README's tables are printed from the saved JSON, numbers included
    saved = tmp_path / "train_step.json"
    saved.write_text(out.stdout)
    figure = tmp_path / "roofline.png"
    md = subprocess.run(
        [sys.executable, cmd[1], "--from-json", str(saved), "--markdown", "--figure", str(figure)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert md.returncode == 0, md.stderr
    fast = report["results"]["dsv3lab[naive,grouped]+fused_loss"]
    assert f"| `dsv3lab[naive,grouped]+fused_loss` | {fast['tokens_per_s']:,.0f} [" in md.stdout
    assert f"fast_vs_reference **{report['ratios']['fast_vs_reference']}**" in md.stdout
    assert figure.stat().st_size > 10_000  # the roofline figure, drawn from the same JSON


def test_gpu_check_script_is_valid_bash_and_names_files_that_exist():
    import re

    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    named = set(re.findall(r"\b((?:tests|benchmarks)/[\w/]+\.py)\b", text))
    assert {
        "benchmarks/fp8_gemm.py",
        "benchmarks/train_step.py",
        "benchmarks/plan_memory.py",
        "benchmarks/gpu_train.py",
        "tests/test_fp8_kernels.py",
    } <= named
    assert all((ROOT / p).exists() for p in named), [p for p in named if not (ROOT / p).exists()]


def _load(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_steps_parse_with_the_scripts_own_parsers():
    """Every `step` line of gpu_check.sh that runs a benchmark with a build_parser(), or the dsv3lab CLI, is accepted
    by that parser (a typo in an option would otherwise surface only on a GPU machine); dsv3lab is installed into the
    machine's environment the README's way and torch is checked to be kept."""
    import shlex

    from dsv3lab import cli

    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert "pip install --no-build-isolation -e ." in text and 'test "$torch_before" = "$torch_after"' in text
    steps = [shlex.split(line.split("#")[0]) for line in text.splitlines() if line.startswith("step ")]
    parsed = set()
    for words in steps:
        if len(words) < 4 or words[3] != "$py":
            continue
        words = [w.replace("$out", "gpu_out") for w in words[4:]]  # after: step NAME SECONDS "$py"
        if words and words[0] in ("benchmarks/plan_memory.py", "benchmarks/gpu_train.py"):
            _load(ROOT / words[0]).build_parser().parse_args(words[1:])
            parsed.add(words[0])
        elif words[:2] == ["-m", "dsv3lab"]:
            cli.build_parser().parse_args(words[2:])
            parsed.add(words[2])
    assert parsed == {"benchmarks/plan_memory.py", "benchmarks/gpu_train.py", "convert", "generate"}


def test_readme_performance_tables_are_the_committed_benchmark_output():
    """The README's Performance tables are exactly what the benchmark prints from its committed JSON (no number typed
    by hand), and the roofline figure it drew is committed next to it."""
    saved = ROOT / "figures" / "perf_train_step.json"
    cmd = [sys.executable, "benchmarks/train_step.py", "--from-json", str(saved), "--markdown"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in (ROOT / "README.md").read_text()
    assert (ROOT / "figures" / "perf_roofline.png").stat().st_size > 10_000
