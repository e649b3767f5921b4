"""The long-context and post-training plots draw what they are given."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import torch

from dsv3lab import ModelConfig
from dsv3lab.model.rope import rope_frequencies
from dsv3lab.viz.long_context import plot_loss_by_position, plot_needle_grid, plot_rope_scaling
from dsv3lab.viz.post_training import plot_grpo_curves, plot_stage_accuracy


def test_rope_scaling_plots_the_frequency_ratio():
    yarn = ModelConfig.preset("tiny")
    pi = yarn.replace(rope_type="linear")
    ax = plot_rope_scaling({"PI": pi, "YaRN": yarn}).axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), np.full(4, 0.25), rtol=1e-6)  # every pair / s
    plain = rope_frequencies(yarn.replace(max_seq_len=yarn.original_seq_len))
    np.testing.assert_allclose(ax.lines[1].get_ydata(), (rope_frequencies(yarn) / plain).numpy(), rtol=1e-6)


def test_loss_by_position_smooths_and_shades_the_trained_context():
    curve = torch.arange(32, dtype=torch.float64)
    ax = plot_loss_by_position({"a": curve}, original_seq_len=8, smooth=1).axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), curve.numpy())
    ax = plot_loss_by_position({"a": np.ones(32)}, original_seq_len=8, smooth=4).axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), np.ones(32))  # a moving average keeps a constant
    assert len(ax.patches) == 1  # the trained-context band


def test_needle_grid_image_is_depth_by_length():
    grid = pd.DataFrame(
        [
            {"length": n, "depth": d, "accuracy": a, "n": 4}
            for n, a0 in ((64, 1.0), (128, 0.5))
            for d, a in ((0.0, a0), (1.0, a0 / 2))
        ]
    )
    ax = plot_needle_grid(grid).axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), [[1.0, 0.5], [0.5, 0.25]])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["64", "128"]


def test_grpo_curves_and_stage_bars():
    m = pd.DataFrame({"step": range(6), "reward": np.linspace(0, 1, 6), "correct": 0.5, "format": 1.0, "kl": 0.01})
    val = pd.DataFrame({"step": [3, 6], "accuracy": [0.2, 0.4]})
    fig = plot_grpo_curves(m, val, smooth=1)
    left, right = fig.axes
    np.testing.assert_allclose(left.lines[1].get_ydata(), np.linspace(0, 1, 6))  # the reward, unsmoothed
    np.testing.assert_allclose(left.lines[-1].get_ydata(), [0.2, 0.4])
    np.testing.assert_allclose(right.lines[0].get_ydata(), 0.01)
    table = pd.DataFrame({"greedy": [0.1, 0.5], "sampled": [0.05, 0.3]}, index=["SFT", "GRPO"])
    ax = plot_stage_accuracy(table).axes[0]
    assert sorted(round(p.get_height(), 2) for p in ax.patches) == [0.05, 0.1, 0.3, 0.5]
