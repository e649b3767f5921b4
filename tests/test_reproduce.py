"""`dsv3lab reproduce --fast` end to end: every registered experiment writes its files, section and summary."""

import json

import pytest

from dsv3lab import reproduce
from dsv3lab.cli import main

pytestmark = pytest.mark.slow  # trains the --fast suite (about a minute)


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    assert main(["reproduce", "--fast", "--out", str(out)]) == 0
    return out


def test_every_experiment_wrote_its_section(fast_run):
    report = (fast_run / "REPORT.md").read_text()
    for name in reproduce.load_registry():
        assert (fast_run / "sections" / f"{name}.md").exists(), name
    assert "## Tour" in report and "nothing here is typed in by hand" in report


def test_tour_outputs(fast_run):
    import pandas as pd

    table = pd.read_csv(fast_run / "presets.csv").set_index("preset")
    assert list(table.index) == ["tiny", "toy", "small", "16B", "236B", "671B"]
    assert table.loc["671B", "kv_latent_bytes_per_token"] == 70_272
    for col in ("total_params", "activated_params", "mtp_params", "kv_materialized_bytes_per_token", "flops_per_token"):
        assert col in table.columns
    assert (fast_run / "kv_cache.png").stat().st_size > 10_000
    summary = json.loads((fast_run / "summary.json").read_text())
    assert summary["tour"]["671B"]["kv_cache_bytes_per_token"]["latent"] == 70_272
    assert summary["_meta"]["fast"] is True


def test_only_refreshes_one_experiment_and_keeps_the_rest(fast_run):
    before = json.loads((fast_run / "summary.json").read_text())
    assert main(["reproduce", "--fast", "--only", "tour", "--out", str(fast_run)]) == 0
    after = json.loads((fast_run / "summary.json").read_text())
    assert set(before) == set(after)


def test_unknown_experiment_is_an_error(tmp_path, capsys):
    assert main(["reproduce", "--only", "nope", "--out", str(tmp_path)]) == 2
    assert "available: tour" in capsys.readouterr().err


def test_training_experiments_summary_and_files(fast_run):
    import pandas as pd

    summary = json.loads((fast_run / "summary.json").read_text())
    for variant in ("none", "aux_loss", "aux_free", "aux_free_seq"):
        entry = summary["load_balance"][variant]
        assert 0 < entry["val_loss"] < 10 and entry["maxvio_batch"] >= 0
    for variant in ("aux_loss", "aux_free"):
        assert summary["specialization"][variant]["score"] >= 0
    assert 0 < summary["mtp"]["off"]["val_loss"] < 10 and 0 < summary["mtp"]["on"]["val_loss"] < 10
    assert 0 <= summary["mtp"]["acceptance_rate"] <= 1
    table = pd.read_csv(fast_run / "load_balance.csv")
    assert set(table.variant) == {"none", "aux_loss", "aux_free", "aux_free_seq"}
    # the summary is computed from the table, not typed in
    assert summary["load_balance"]["aux_free"]["val_loss"] == pytest.approx(
        table[table.variant == "aux_free"].val_loss.mean()
    )
    for name in (
        "load_balance_curves.png",
        "load_heatmaps.png",
        "bias_trajectories.png",
        "specialization.png",
        "mtp.png",
    ):
        assert (fast_run / name).stat().st_size > 10_000, name
    report = (fast_run / "REPORT.md").read_text()
    for title in ("## E1", "## E2", "## E3"):
        assert title in report


def test_fp8_experiment_summary_and_files(fast_run):
    import pandas as pd

    fp8 = json.loads((fast_run / "summary.json").read_text())["fp8"]
    for key in ("rel_loss_diff_final", "rel_loss_diff_max"):
        assert isinstance(fp8[key], float) and 0 <= fp8[key] < 0.05, (key, fp8[key])
    assert fp8["rel_loss_diff_max"] >= fp8["rel_loss_diff_final"]
    acc = fp8["accumulation_k4096_max_rel_error"]
    assert acc["no_promotion"] > 10 * acc["promotion_every_128"]
    curves = pd.read_csv(fast_run / "fp8_training.csv")
    assert {"step", "seed", "loss_bf16", "loss_fp8", "rel_diff"} <= set(curves.columns)
    assert (curves.loss_bf16 != curves.loss_fp8).any()  # the two runs really differ (FP8 is on)
    section = (fast_run / "sections" / "fp8.md").read_text()
    assert "rel_loss_diff" in section and "Verdict" in section and "0.25%" in section
    for name in ("fp8_training.png", "fp8_numerics.png"):
        assert (fast_run / name).stat().st_size > 10_000


def test_compare_and_margin_against_hand_computed_standard_errors():
    from dsv3lab.reproduce._common import compare, margin

    # means 1.0 and 0.0, sample std 1 each over 3 seeds: two standard errors = 2·sqrt(2/3) = 1.633
    a, b = [0.0, 1.0, 2.0], [-1.0, 0.0, 1.0]
    assert compare(a, b) == "within noise"
    assert margin(a, b) == "difference +1.000, two standard errors 1.633"
    shifted = [x + 1.0 for x in a]  # difference 2.0: beyond 1.633 but below 1.5 × 1.633
    assert compare(shifted, b) == "higher" and "; marginal" in margin(shifted, b)
    far = [x + 3.0 for x in a]
    assert compare(b, far) == "lower" and "marginal" not in margin(far, b)
    assert compare([1.0], [2.0]) == "one seed" and margin([1.0], [2.0]) == "difference -1.000 (one seed)"


def test_pipeline_experiment_outputs(fast_run):
    import pandas as pd

    summary = json.loads((fast_run / "summary.json").read_text())["pipeline"]
    assert summary["table2_exact"] is True and summary["max_rel_grad_diff"] < 1e-5
    t2 = pd.read_csv(fast_run / "pipeline_table2.csv")  # 2 cost sets x 3 PP x 4 schedules, every one exact
    assert len(t2) == 24 and t2.exact.all() and t2.assumptions_met.all()
    assert (t2.bubble_simulated == t2.bubble_table2).all()
    rows = pd.read_csv(fast_run / "pipeline_measured.csv")
    assert set(rows.schedule) == {"1f1b", "dualpipev", "dualpipe"} and (rows.busy_s > 0).all()
    for name in ("pipeline_fig5.png", "pipeline_measured.png", "pipeline_bubble_vs_micro.png"):
        assert (fast_run / name).stat().st_size > 10_000, name
    assert "## C12" in (fast_run / "REPORT.md").read_text()


def test_expert_parallel_experiment_summary_and_files(fast_run):
    import pandas as pd

    ep = json.loads((fast_run / "summary.json").read_text())["expert_parallel"]
    diff = ep["ep_max_abs_diff"]
    assert diff["logits"] <= 1e-5 and diff["grad"] <= 1e-6 and diff["bias"] == 0 and diff["logits_replicated"] <= 1e-5
    nodes = ep["nodes_per_token"]
    assert nodes["max_limited"] <= 4 and nodes["limited"] < nodes["free"]
    assert ep["dispatch_ib_bytes"]["limited"] < ep["dispatch_ib_bytes"]["free"]
    assert 8 <= ep["hidden_k"] <= 16 and ep["paper_max_experts"] == pytest.approx(12.8)
    balance = pd.read_csv(fast_run / "expert_parallel_balance.csv")
    measured = balance.dropna(subset=["before"])
    assert (measured["global"] < measured.before).all()  # EPLB improves on the contiguous placement
    assert len(ep["balance"]) == len(balance) and len(ep["aging"]) >= 2
    section = (fast_run / "sections" / "expert_parallel.md").read_text()
    assert "## C13" in section and "Verdict" in section
    for name in ("expert_parallel_traffic.png", "expert_parallel_eplb.png"):
        assert (fast_run / name).stat().st_size > 10_000, name


def test_scale_experiment_in_the_report(fast_run):
    scale = json.loads((fast_run / "summary.json").read_text())["scale"]
    assert scale["training_fits_80gb"] and scale["table1_arithmetic_agrees"]
    assert (fast_run / "scale_memory.png").stat().st_size > 10_000
    assert "## C14" in (fast_run / "REPORT.md").read_text()
