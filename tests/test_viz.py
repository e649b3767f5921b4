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


def test_plot_yarn_draws_the_wavelengths_and_the_ramp_of_the_config():
    from dsv3lab.model.rope import linear_ramp, rope_frequencies

    cfg = ModelConfig.preset("671B")
    fig = viz.plot_yarn(cfg)
    waves, ramp = fig.axes
    assert waves.get_xlabel() and waves.get_ylabel() and ramp.get_xlabel() and ramp.get_ylabel()
    yarn_line = next(line for line in waves.lines if line.get_label().startswith("YaRN"))
    np.testing.assert_allclose(yarn_line.get_ydata(), 2 * np.pi / rope_frequencies(cfg).numpy(), rtol=1e-6)
    np.testing.assert_allclose(ramp.lines[0].get_ydata(), 1 - linear_ramp(10, 23, 32).numpy())  # γ_i, ramp [10, 23]
    assert "low=10, high=23" in ramp.get_title()


def test_yarn_summary_counts_the_pairs_and_the_mscale():
    from dsv3lab.viz.widgets import yarn_config, yarn_summary

    text = yarn_summary(ModelConfig.preset("671B"))
    assert "ramp [10, 23]" in text and "pairs 0–10 keep" in text and "12 blend" in text and "9 are divided" in text
    assert "√t = 1.369" in text and "×1.874" in text
    cfg = yarn_config(ModelConfig.preset("671B"), 80, 64, 1)
    assert (cfg.rope_factor, cfg.beta_fast, cfg.beta_slow, cfg.max_seq_len) == (80.0, 64, 1, 80 * 4096)
    assert "ramp [8, 23]" in yarn_summary(cfg) and "√t = 1.438" in yarn_summary(cfg)
    with pytest.raises(ValueError, match="beta_fast"):
        yarn_config(ModelConfig.preset("671B"), 40, 2, 2)


def _shown_png(out) -> bytes:
    """The one PNG an ipywidgets Output holds, decoded."""
    import base64

    assert len(out.outputs) == 1 and out.outputs[0]["output_type"] == "display_data"
    png = base64.b64decode(out.outputs[0]["data"]["image/png"])
    assert png.startswith(b"\x89PNG")
    return png


def test_show_figure_sets_the_output_state_and_closes_the_figure():
    pytest.importorskip("ipywidgets")
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from dsv3lab.viz.widgets import show_figure

    out = w.Output()
    fig = viz.plot_yarn_ramp(ModelConfig.preset("671B"))
    show_figure(out, fig)
    _shown_png(out)
    assert not plt.fignum_exists(fig.number)


def test_yarn_widget_redraws_inside_its_output_on_change():
    pytest.importorskip("ipywidgets")
    from dsv3lab.viz.widgets import yarn_explorer

    box = yarn_explorer("671B")
    (s_w, beta_w, alpha_w), summary, out = box.children[0].children, box.children[1], box.children[2]
    assert "ramp [10, 23]" in summary.value
    first = _shown_png(out)
    beta_w.value = 64
    assert "ramp [8, 23]" in summary.value and _shown_png(out) != first
    s_w.value = 80
    assert "s=80" in summary.value and "√t = 1.438" in summary.value
    beta_w.value, alpha_w.value = 2, 2  # β <= α: a message, no figure
    assert "must be larger" in summary.value and out.outputs == ()


def test_accumulation_widget_redraws_inside_its_output_on_change():
    pytest.importorskip("ipywidgets")
    from dsv3lab.fp8.accum import accumulation_sweep
    from dsv3lab.viz.widgets import accumulation_explorer, accumulation_summary

    box = accumulation_explorer(ks=(256, 512), m=4, n=4)
    (bits_w, nc_w, dist_w), summary, out = box.children[0].children, box.children[1], box.children[2]
    sweep = accumulation_sweep(ks=(256, 512), m=4, n=4, acc_bits=14, promote_every=128, dists=("positive",))
    assert summary.value == f"<code>{accumulation_summary(sweep)}</code>"
    first = _shown_png(out)
    nc_w.value = 512  # one promotion at the end of K = 512: the error of no promotion
    sweep = accumulation_sweep(ks=(256, 512), m=4, n=4, acc_bits=14, promote_every=512, dists=("positive",))
    at_k = sweep[sweep.K == 512].set_index("promotion").max_rel_error
    assert at_k["every 512"] == pytest.approx(at_k["none"], rel=1e-3)
    assert "every 512" in summary.value and _shown_png(out) != first
    bits_w.value = 24
    assert summary.value.startswith("<code>24-bit accumulator")
    before = summary.value
    dist_w.value = "normal"  # zero-mean operands: a different sweep, a different line
    assert summary.value != before and summary.value.startswith("<code>24-bit accumulator")


def test_accumulation_summary_reads_the_largest_k():
    from dsv3lab.viz.widgets import accumulation_summary

    df = pd.DataFrame(
        {
            "dist": ["positive"] * 4,
            "K": [256, 256, 512, 512],
            "promotion": ["none", "every 128", "none", "every 128"],
            "acc_bits": [14] * 4,
            "max_rel_error": [0.01, 0.001, 0.02, 0.002],
        }
    )
    assert (
        accumulation_summary(df) == "14-bit accumulator, K = 512, max_rel_error — none: 2.00e-02, every 128: 2.00e-03"
    )
