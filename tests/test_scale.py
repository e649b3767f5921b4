"""C14 ``scale``: the planner's checks of the paper's layout and Table 1, and verdicts that can fail."""

import json

import pytest
import torch

from dsv3lab.plan import paper_checks
from dsv3lab.reproduce import Context, load_registry, scale


@pytest.fixture(scope="module")
def c14(tmp_path_factory):
    out = tmp_path_factory.mktemp("c14")
    load_registry()
    result = scale.run(Context(out=out, fast=True, seeds=[0], device=torch.device("cpu"), log=lambda _: None))
    return out, result


def test_c14_files_summary_and_verdicts(c14):
    out, result = c14
    s = result.summary["scale"]
    assert s["training_fits_80gb"] and 75 < s["training_total_gb"] <= 80
    assert not s["neighbours_fit"]["ZeRO-0"] and not s["neighbours_fit"]["EP8"]  # the layout is tight
    assert 0.39 < s["implied_mfu_bf16"] < 0.42 and s["mfu_plausible"] and s["table1_arithmetic_agrees"]
    assert s["prefill_fits"] and s["decode_fits"]
    assert json.loads((out / "scale.json").read_text()) == s
    for name in result.files:
        assert (out / name).stat().st_size > 100, name
    assert "## C14" in result.report and "Verdict" in result.report and "40.6%" in result.report


def test_table1_rows_agree_within_rounding_and_can_disagree():
    checks = paper_checks()
    rows = scale.table1_checks(checks)
    assert [r["agrees"] for r in rows[:4]] == [True] * 4  # 3.662 days is 3.7 at the paper's one decimal
    assert rows[2]["computed"] == pytest.approx(180e3 / 2048 / 24)
    wrong = dict(checks, days_per_trillion_on_2048=3.8)
    assert not scale.table1_checks(wrong)[2]["agrees"]


def test_the_mfu_rule_can_fail(c14, monkeypatch, tmp_path):
    real = scale.paper_checks
    monkeypatch.setattr(scale, "paper_checks", lambda cfg: dict(real(cfg), implied_mfu_bf16=0.9))
    result = scale.run(Context(out=tmp_path, fast=True, seeds=[0], device=torch.device("cpu"), log=lambda _: None))
    assert not result.summary["scale"]["mfu_plausible"] and "NOT consistent" in result.report
