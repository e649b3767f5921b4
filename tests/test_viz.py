"""The plotting functions draw what they are given, and the widget redraws when a slider moves."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors
import numpy as np
import pandas as pd
import pytest
import torch

from dsv3lab import ModelConfig, viz
from dsv3lab.accounting import kv_cache_comparison
from dsv3lab.utils import time_alternating
from dsv3lab.viz import layout, training


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


def _png(out) -> str:
    """The one PNG an Output widget shows (base64)."""
    assert len(out.outputs) == 1, out.outputs
    return out.outputs[0]["data"]["image/png"]


def test_kv_rank_widget_redraws_on_change():
    pytest.importorskip("ipywidgets")
    from dsv3lab.viz.widgets import kv_rank_explorer, kv_rank_summary

    cfg = ModelConfig.preset("671B")
    assert "MLA 70,272 B/token" in kv_rank_summary(cfg) and "2.25 groups" in kv_rank_summary(cfg)
    box = kv_rank_explorer("671B")
    summary, out = box.children[2], box.children[3]
    assert "d_c=512" in summary.value
    before = _png(out)
    rank = box.children[1].children[0]
    rank.value = 256
    assert "d_c=256" in summary.value
    bytes_256 = (256 + 64) * 61 * 2
    assert f"MLA {bytes_256:,} B/token" in summary.value
    assert _png(out) != before  # the figure was redrawn into the widget's own output


def test_kv_rank_widget_preset_change_sets_the_presets_ranks():
    """Issue 16 §5: after a slider move and a preset change, d_c and d_h^R kept the previous preset's values (the
    summary then said "0.4× more"), and the redraw escaped the widget's output."""
    pytest.importorskip("ipywidgets")
    from dsv3lab.viz.widgets import kv_rank_explorer

    box = kv_rank_explorer("671B")
    (preset, groups), (rank, rope), summary, out = *(c.children for c in box.children[:2]), *box.children[2:]
    rank.value = 1024
    moved = _png(out)
    preset.value = "toy"
    toy = ModelConfig.preset("toy")
    assert (rank.value, rope.value) == (toy.kv_lora_rank, toy.qk_rope_head_dim)
    assert groups.max == toy.n_heads and groups.value == min(8, toy.n_heads)
    kv = kv_cache_comparison(toy, groups.value)
    mla, mha = kv["MLA (latent)"], kv["MHA"]
    assert f"MLA {mla:,} B/token; MHA {mha:,} = {mha / mla:.1f}× MLA" in summary.value
    assert _png(out) != moved


def test_kv_summary_never_says_more_for_less():
    from dsv3lab.viz.widgets import kv_rank_summary

    cfg = ModelConfig.preset("toy").replace(kv_lora_rank=512, qk_rope_head_dim=64)  # MLA > MHA here
    assert "MHA 2,048 = 0.44× MLA" in kv_rank_summary(cfg, 4)


def test_kv_vs_rank_baselines_each_have_their_own_style():
    ax = viz.plot_kv_vs_rank(ModelConfig.preset("671B")).axes[0]
    styles = {
        line.get_label(): (matplotlib.colors.to_hex(line.get_color()), line.get_linestyle())
        for line in ax.lines
        if line.get_label() in ("MHA", "GQA", "MQA")
    }
    assert len(styles) == 3 and len(set(styles.values())) == 3, styles


def _loads(steps=12, layers=2, experts=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 40, (steps, layers, experts)), rng.normal(0, 0.01, (steps, layers, experts))


def test_plot_load_step_draws_the_window_and_marks_the_step():
    counts, bias = _loads()
    fig = training.plot_load_step(counts, bias, step=7, layer=1, window=3)
    heat, traj = fig.axes[0], fig.axes[1]
    c = counts[5:8].sum(axis=0)
    np.testing.assert_allclose(heat.images[0].get_array(), c / c.mean(axis=-1, keepdims=True))
    np.testing.assert_allclose(traj.lines[0].get_ydata(), bias[:, 1, 0])
    assert any(np.allclose(line.get_xdata(), 7) for line in traj.lines)
    assert layout.text_overlaps(fig) == []
    with pytest.raises(ValueError, match="step"):
        training.plot_load_step(counts, bias, step=12)


def test_text_overlaps_finds_the_colorbar_label_on_the_next_panel():
    """Notebook 04's scrubber before the fix: two panels without a layout engine, the left one's colorbar label and
    ticks under the right one's y label. The check must see it; constrained layout must clear it."""
    import matplotlib.pyplot as plt

    counts, bias = _loads()
    found = {}
    for engine in (None, "constrained"):
        fig, axes = plt.subplots(1, 2, figsize=(13, 3), layout=engine)
        training.plot_load_heatmap(training.relative_load_window(counts, 0, 5), ax=axes[0])
        training.plot_bias_trajectories(bias, ax=axes[1])
        found[engine] = layout.text_overlaps(fig)
        plt.close(fig)
    assert any("bias $b_i$" in p and "<colorbar>" in p for p in found[None]), found[None]
    assert found["constrained"] == []


def test_text_overlaps_ignores_what_is_not_drawn():
    """A twin's shared x axis is hidden (its labels still say visible), an axes switched off draws no ticks."""
    import matplotlib.pyplot as plt

    fig, (ax, off) = plt.subplots(1, 2, figsize=(6, 2.5), layout="constrained")
    ax.plot([0, 1], [0, 1])
    ax.twinx().plot([0, 1], [1, 0])
    off.axis("off")
    off.set_xticks([0.5], ["a long label that would run into the panel on the left"])
    assert layout.text_overlaps(fig) == []
    plt.close(fig)


def test_figure_hook_warns_on_overlapping_labels():
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"figure.hooks": ["dsv3lab.viz.layout:warn_on_overlaps"]}):
        fig, axes = plt.subplots(1, 2, figsize=(3, 2))
        for ax in axes:  # each x tick label wider than its panel
            ax.set_xticks([0.5], ["a tick label wider than its panel"])
        with pytest.warns(layout.LayoutWarning, match="overlapping labels"):
            fig.canvas.draw()
        plt.close(fig)


def test_load_scrubber_redraws_into_its_output():
    pytest.importorskip("ipywidgets")
    from dsv3lab.viz.widgets import load_scrubber

    a, b = _loads(seed=0), _loads(seed=1)
    box = load_scrubber({"none": a[0], "aux_free": b[0]}, {"none": a[1], "aux_free": b[1]})
    (run, step, layer), out = box.children[0].children, box.children[1]
    assert (run.value, step.value, layer.value) == ("none", 11, 0)
    seen = {_png(out)}
    for widget, value in ((step, 3), (layer, 1), (run, "aux_free")):
        widget.value = value
        seen.add(_png(out))
    assert len(seen) == 4  # each change drew a new figure into the same output
    with pytest.raises(ValueError, match="same runs"):
        load_scrubber({"none": a[0]}, {"x": a[1]})


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


def test_relative_load_heatmaps_are_centred_at_one():
    """Every relative-load heatmap maps 1 (balanced) to the middle of the diverging colormap, 0 and vmax to its
    ends, whatever vmax is (issue 15 §5)."""
    import matplotlib.pyplot as plt

    counts, _ = _loads()
    load = training.relative_load_window(counts, 0, 4)
    expert_load = pd.DataFrame(
        {"layer": 1, "domain": ["code"] * 4 + ["math"] * 4, "expert": list(range(4)) * 2, "relative_load": 1.0}
    )
    figs = [
        training.plot_load_heatmap(load, vmax=4.0),
        training.plot_load_heatmaps({"none": counts, "aux_free": counts}, points=[0.5, 1.0], vmax=8.0),
        training.plot_domain_load(expert_load, layer=1, vmax=3.0),
    ]
    for fig, vmax in zip(figs, (4.0, 8.0, 3.0)):
        images = [im for ax in fig.axes for im in ax.images]
        assert images
        for im in images:
            assert im.get_cmap().name == "RdBu_r"
            np.testing.assert_allclose(im.norm([0.0, 1.0, vmax]), [0.0, 0.5, 1.0])
        plt.close(fig)
    with pytest.raises(ValueError, match="vmax"):
        training.relative_load_norm(1.0)


def test_plot_bias_update_draws_maxvio_and_the_bias():
    from dsv3lab.balance import max_violation

    counts, bias = _loads(steps=6, layers=1, experts=8)
    counts, bias = counts[:, 0], bias[:, 0]
    fig = training.plot_bias_update(counts, bias, gamma=1e-3, rule="sign_centered")
    vio_ax, bias_ax = fig.axes
    np.testing.assert_allclose(vio_ax.lines[0].get_ydata(), max_violation(torch.as_tensor(counts)).numpy())
    np.testing.assert_allclose(bias_ax.lines[3].get_ydata(), bias[:, 3])
    assert "γ = 0.001" in vio_ax.get_title() and f"{bias[-1].sum():+.3f}" in bias_ax.get_title()
    assert layout.text_overlaps(fig) == []
    with pytest.raises(ValueError, match="steps, experts"):
        training.plot_bias_update(counts, bias[:, :4])


def test_bias_update_widget_redraws_inside_its_output_on_change():
    pytest.importorskip("ipywidgets")
    from dsv3lab.balance import simulate_bias_update
    from dsv3lab.viz.widgets import bias_update_explorer, bias_update_summary

    g = torch.Generator().manual_seed(0)
    scores = (torch.randn(1, 32, 8, generator=g) + torch.linspace(1, 0, 8)).sigmoid().expand(60, -1, -1)
    box = bias_update_explorer(scores, k=2)
    (gamma_w, rule_w), summary, out = box.children[0].children, box.children[1], box.children[2]
    assert (gamma_w.value, rule_w.value) == (1e-3, "sign")
    assert summary.value == f"<code>{bias_update_summary(*simulate_bias_update(scores, 2, 1e-3), 1e-3, 'sign')}</code>"
    assert "the paper's γ" in summary.value
    first = _shown_png(out)
    gamma_w.value = 1e-2
    assert "10× the paper's 0.001" in summary.value and _shown_png(out) != first
    rule_w.value = "sign_centered"
    assert "Σ b_i = +0.000" in summary.value or "Σ b_i = -0.000" in summary.value
    gamma_w.value = 0.0  # no update: the first load stays, the bias stays 0
    vio0 = summary.value.split("MaxVio ")[1].split(" at")[0]
    assert f"{vio0} over the last" in summary.value and "Σ b_i = +0.000" in summary.value
    with pytest.raises(ValueError, match="gamma must be one of"):
        bias_update_explorer(scores, k=2, gamma=0.5)


def test_bias_update_summary_finds_the_first_balanced_update():
    from dsv3lab.viz.widgets import bias_update_summary

    counts = torch.tensor([[8, 0, 0, 0], [4, 4, 0, 0], [3, 2, 2, 1], [2, 2, 2, 2]])  # MaxVio 3, 1, 0.5, 0
    bias = torch.zeros(4, 4)
    line = bias_update_summary(counts, bias, 3e-3, "sign", window=2)
    assert line.startswith("γ = 0.003 (3× the paper's 0.001), rule sign: MaxVio 3.00 at the first update")
    assert "0.25 over the last 2 of 4" in line and "first under 0.5 after update 3" in line
    assert "never under 0.5" in bias_update_summary(counts[:2], bias[:2], 1e-3, "sign")


def test_widget_callbacks_draw_with_pyplot_interactive_mode_off(monkeypatch):
    """A figure made while pyplot is interactive is queued for the inline backend, which in JupyterLab shows it a
    second time in the log console after a slider change; every widget callback draws with interactive mode off."""
    import matplotlib
    import matplotlib.pyplot as plt

    from dsv3lab.viz import widgets

    seen = []
    real = widgets.plot_yarn

    def recording(*args, **kwargs):
        seen.append(matplotlib.is_interactive())
        return real(*args, **kwargs)

    monkeypatch.setattr(widgets, "plot_yarn", recording)
    plt.ion()
    try:
        box = widgets.yarn_explorer("toy")
        box.children[0].children[0].value = 8  # s: a change runs the callback again
    finally:
        plt.ioff()
    assert seen == [False, False] and not matplotlib.is_interactive()
