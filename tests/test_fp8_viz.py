"""The FP8 figures draw what they say: one line per setting, the reference markers, nothing empty."""

import matplotlib

matplotlib.use("Agg")

import pandas as pd

from dsv3lab.fp8.accum import accumulation_sweep, accumulator_bits_sweep, promotion_interval_sweep
from dsv3lab.fp8.compare import loss_curves
from dsv3lab.fp8.quant import outlier_scaling_demo
from dsv3lab.viz import fp8 as vfp8


def test_grid_and_granularity_plots():
    ax = vfp8.plot_fp8_grid().axes[0]
    assert len(ax.lines) == 2 + 2 * 3  # one point series per format + 3 range markers each
    df = outlier_scaling_demo(magnitudes=(1, 1e4), tokens=32, channels=256)
    ax = vfp8.plot_scaling_granularity(df).axes[0]
    assert [line.get_label() for line in ax.lines] == list(dict.fromkeys(df.granularity))


def test_accumulation_plots():
    sweep = accumulation_sweep(ks=(256, 512), m=4, n=4, dists=("positive",))
    ax = vfp8.plot_accumulation_vs_k(sweep).axes[0]
    assert len(ax.lines) == 3  # no promotion, promotion, the paper's point
    n_c = promotion_interval_sweep((32, 128), k=256, m=4, n=4)
    assert len(vfp8.plot_accumulation_vs_nc(n_c).axes[0].lines) == 2  # the dist line + the N_C = 128 marker
    bits = accumulator_bits_sweep((14, 16), k=256, m=4, n=4)
    assert len(vfp8.plot_accumulation_vs_bits(bits).axes[0].lines) == 2 + 2  # 2 promotions + paper line + 14 marker


def test_fp8_vs_bf16_plot():
    run = pd.DataFrame({"step": range(5), "loss_main": [5.0, 4.0, 3.5, 3.2, 3.0]})
    other = run.assign(loss_main=run.loss_main * 1.001)
    curves = pd.concat([loss_curves(run, other, seed=s) for s in (0, 1)])
    fig = vfp8.plot_fp8_vs_bf16(curves)
    top, bottom = fig.axes
    assert len(top.lines) == 2 and len(bottom.lines) == 2 + 1  # two seeds + the 0.25% line
