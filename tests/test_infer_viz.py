"""The inference figures draw the data they are given."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd

from dsv3lab.viz.inference import plot_acceptance, plot_acceptance_over_training, plot_attention_cost, plot_max_context


def test_acceptance_histogram_shares():
    fig = plot_acceptance([0, 1, 1, 2, 1], depth=2)
    heights = [p.get_height() for p in fig.axes[0].patches]
    np.testing.assert_allclose(heights, [0.2, 0.6, 0.2])
    assert "2.00 tokens per forward" in fig.axes[0].get_title()


def test_other_figures_plot_their_columns():
    t = pd.DataFrame(
        {
            "preset": ["a", "b"],
            "max_context_latent": [100, 1000],
            "max_context_materialized": [10, 50],
            "budget_bytes": [8e10, 8e10],
        }
    )
    fig = plot_max_context(t)
    assert [p.get_height() for p in fig.axes[0].patches] == [100, 1000, 10, 50]
    cost = pd.DataFrame(
        {"context": [8, 16, 8, 16], "path": ["absorb", "absorb", "expand", "expand"], "macs": [1, 2, 3, 6]}
    )
    lines = plot_attention_cost(cost).axes[0].get_lines()
    assert [list(line.get_ydata()) for line in lines] == [[1, 2], [3, 6]]
    tr = pd.DataFrame({"step": [0, 10], "acceptance_rate": [0.1, 0.5], "tokens_per_forward": [1.1, 1.5]})
    assert list(plot_acceptance_over_training(tr).axes[0].get_lines()[0].get_ydata()) == [0.1, 0.5]
