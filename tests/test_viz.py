"""The plotting functions draw what they are given, and the widget redraws when a slider moves."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch

from dsv3lab import ModelConfig, viz
from dsv3lab.utils import time_alternating


def test_plot_bars_draws_one_bar_per_case_and_variant():
    df = pd.DataFrame({"case": ["a", "a", "b", "b"], "impl": ["x", "y", "x", "y"], "s": [1.0, 2.0, 3.0, 4.0]})
    fig = viz.plot_bars(df, x="case", hue="impl", y="s")
    heights = sorted(p.get_height() for p in fig.axes[0].patches)
    assert heights == [1.0, 2.0, 3.0, 4.0]


def test_plot_step_losses_one_line_per_column():
    df = pd.DataFrame({"step": [0, 1, 2], "main": [3.0, 2.0, 1.0], "mtp_1": [3.1, 2.2, 1.5]})
    ax = viz.plot_step_losses(df).axes[0]
    assert [line.get_label() for line in ax.lines] == ["main", "mtp_1"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [3.0, 2.0, 1.0])


def test_plot_expert_counts_heights_and_balance_line():
    counts = {"before": torch.tensor([4, 0, 2, 2]), "after": [2, 2, 2, 2]}
    ax = viz.plot_expert_counts(counts, n_groups=2).axes[0]
    assert sorted(p.get_height() for p in ax.patches) == [0, 2, 2, 2, 2, 2, 2, 4]
    assert any(np.allclose(line.get_ydata(), 2.0) for line in ax.lines)  # the balanced load


def test_plot_gate_scores_mean_of_sorted_affinities():
    s = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    ax = viz.plot_gate_scores({"softmax": s}, top_k=1).axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.6, 0.25, 0.15], rtol=1e-6)


def test_kv_rank_widget_redraws_on_change():
    pytest.importorskip("ipywidgets")
    from dsv3lab.viz.widgets import kv_rank_explorer, kv_rank_summary

    cfg = ModelConfig.preset("671B")
    assert "MLA 70,272 B/token" in kv_rank_summary(cfg) and "2.25 groups" in kv_rank_summary(cfg)
    box = kv_rank_explorer("671B")
    summary = box.children[2]
    assert "d_c=512" in summary.value
    rank = box.children[1].children[0]
    rank.value = 256
    assert "d_c=256" in summary.value
    bytes_256 = (256 + 64) * 61 * 2
    assert f"MLA {bytes_256:,} B/token" in summary.value


def test_time_alternating_reports_every_function():
    calls = []
    df = time_alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then alternating rounds
    assert list(df["name"]) == ["a", "b"] and (df["min_s"] <= df["median_s"]).all()
    assert (df["median_s"] <= df["max_s"]).all() and (df["repeats"] == 3).all()
    with pytest.raises(ValueError, match="repeats"):
        time_alternating({"a": lambda: None}, repeats=0)
