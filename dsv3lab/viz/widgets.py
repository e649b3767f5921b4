"""ipywidgets explorers. Each wraps a pure plotting function of this package; a notebook shows the static figure of
that function first, so executed and exported notebooks keep a result even where widgets do not render.

* :func:`kv_rank_explorer` — MLA's latent rank d_c and rotary width d_h^R against the KV cache of MHA/GQA/MQA with
  the same heads (wraps :func:`dsv3lab.viz.plot_kv_vs_rank`). Notebook: 02_mla.
* :func:`plan_explorer` — a training layout (GPUs, PP, EP, ZeRO, micro-batch, sequence) planned beside the paper's
  (wraps :func:`dsv3lab.viz.plot_plan_memory` over :func:`dsv3lab.plan.plan`). Notebook: 11_scale_to_full.
* :func:`yarn_explorer` — YaRN's scale s and ramp bounds β (``beta_fast``) and α (``beta_slow``) against the
  wavelength of every rotary pair (wraps :func:`dsv3lab.viz.plot_yarn`). Notebook: 01_building_blocks.
* :func:`pipeline_explorer` — a pipeline schedule's simulated Gantt chart under chosen PP, micro-batches, chunk
  costs and all-to-all overlap, against Table 2 (wraps :func:`dsv3lab.viz.pipeline.plot_gantt`). Notebook: 08_dualpipe.
* :func:`accumulation_explorer` — the FP8 GEMM's accumulator bits and promotion interval N_C against the error over
  K (wraps :func:`dsv3lab.viz.fp8.plot_accumulation_vs_k`). Notebook: 07_fp8.

* :func:`bias_update_explorer` — the auxiliary-loss-free bias update's speed γ and rule (``sign``, ``sign_centered``)
  on a fixed router's affinities (wraps :func:`dsv3lab.viz.training.plot_bias_update` over
  :func:`dsv3lab.balance.simulate_bias_update`). Notebook: 04_load_balancing.
* :func:`load_scrubber` — step and layer sliders over the expert loads and selection biases of trained runs (wraps
  :func:`dsv3lab.viz.training.plot_load_step`). Notebook: 04_load_balancing.
* :func:`eplb_explorer` — nodes × GPUs × redundant slots (and the policy) over the per-GPU loads before and after EPLB
  (wraps :func:`dsv3lab.viz.expert_parallel.plot_gpu_loads`). Notebook: 09_expert_parallel.

A widget draws its figure into its ``Output`` by setting the output's state (:func:`show_figure`), not by printing
inside ``with out:``: a redraw from a slider callback then cannot escape to JupyterLab's log console, whatever the
kernel's message routing does, and the saved widget state carries the figure into exported pages.
"""

from __future__ import annotations

import base64
import functools
import io
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from ..accounting import kv_cache_comparison
from ..balance import BIAS_RULES, PAPER_GAMMA, max_violation, simulate_bias_update
from ..config import ModelConfig
from ..fp8.accum import N_C, accumulation_sweep
from ..model.rope import rope_frequencies, yarn_correction_range
from ..parallel.eplb import contiguous_placement, rebalance_experts, resolve_policy
from ..parallel.schedules import SCHEDULES, make_schedule
from ..parallel.simulator import TABLE2_FORMULAS, Costs, simulate, table2
from ..plan import PAPER_TRAINING, Layout, plan, plan_table
from .architecture import plot_kv_vs_rank, plot_yarn
from .expert_parallel import plot_gpu_loads
from .fp8 import plot_accumulation_vs_k
from .pipeline import plot_gantt
from .plan import plot_plan_memory
from .training import plot_bias_update, plot_load_step

RANKS = [16, 32, 64, 128, 256, 512, 1024, 2048]
ROPE_DIMS = [16, 32, 64, 128]


def figure_output(fig: Figure, dpi: int = 80) -> dict:
    """A Jupyter ``display_data`` output holding ``fig`` as PNG (what an ``Output`` widget stores)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return {
        "output_type": "display_data",
        "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"), "text/plain": repr(fig)},
        "metadata": {},
    }


def redraws(callback):
    """A widget callback that draws with pyplot's interactive mode off. A figure made while pyplot is interactive is
    also queued for the inline backend, which shows it again wherever the kernel's next output goes — in JupyterLab
    the log console, after a slider or dropdown change. The callback shows its figure in its own Output by state
    (:func:`show_figure`) instead."""

    @functools.wraps(callback)
    def quiet(*args, **kwargs):
        with plt.ioff():
            return callback(*args, **kwargs)

    return quiet


def show_figure(out, fig: Figure) -> None:
    """Replace what the ``ipywidgets.Output`` ``out`` shows by ``fig`` in one state update, and close ``fig``."""
    try:
        out.outputs = (figure_output(fig),)
    finally:
        plt.close(fig)


def _times(a: float, b: float) -> str:
    """``a`` as a multiple of ``b``: '9.0×' or '0.44×' (never 'more' for less)."""
    r = a / b
    return f"{r:.1f}×" if r >= 1 else f"{r:.2f}×"


def kv_rank_summary(cfg: ModelConfig, gqa_groups: int = 8) -> str:
    """One line: MLA bytes per token (all layers, BF16) against MHA/GQA/MQA, and the GQA group count it equals."""
    kv = kv_cache_comparison(cfg, gqa_groups)
    mla, mha = kv["MLA (latent)"], kv["MHA"]
    equivalent_groups = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) / (2 * cfg.qk_nope_head_dim)
    return (
        f"{cfg.name}: d_c={cfg.kv_lora_rank}, d_h^R={cfg.qk_rope_head_dim} → MLA {mla:,} B/token; "
        f"MHA {mha:,} = {_times(mha, mla)} MLA, GQA-{min(gqa_groups, cfg.n_heads)} {kv['GQA']:,}, "
        f"MQA {kv['MQA']:,}; MLA's cache equals GQA with {equivalent_groups:.2f} groups"
    )


def kv_rank_explorer(preset: str = "671B", presets: tuple[str, ...] = ("toy", "small", "16B", "236B", "671B")):
    """Sliders for the preset, d_c (``kv_lora_rank``), d_h^R (``qk_rope_head_dim``) and the GQA group count; redraws
    :func:`plot_kv_vs_rank` and a one-line summary. Choosing a preset sets d_c, d_h^R and the group count to that
    preset's values. Returns the widget (display it, or read ``.children``: [preset, groups], [d_c, d_h^R], summary,
    plot)."""
    import ipywidgets as w

    if preset not in presets:
        raise ValueError(f"preset must be one of {presets}, got {preset!r}")
    cfgs = {p: ModelConfig.preset(p) for p in presets}
    ranks = sorted(set(RANKS) | {c.kv_lora_rank for c in cfgs.values()})
    rope_dims = sorted(set(ROPE_DIMS) | {c.qk_rope_head_dim for c in cfgs.values()})
    base = cfgs[preset]
    preset_w = w.Dropdown(options=list(presets), value=preset, description="preset")
    rank_w = w.SelectionSlider(options=ranks, value=base.kv_lora_rank, description="d_c")
    rope_w = w.SelectionSlider(options=rope_dims, value=base.qk_rope_head_dim, description="d_h^R")
    groups_w = w.IntSlider(value=min(8, base.n_heads), min=1, max=base.n_heads, description="GQA groups")
    summary = w.HTML()
    out = w.Output()
    busy = [False]  # a preset change moves three sliders: draw once, after all of them

    @redraws
    def redraw(*_):
        if busy[0]:
            return
        cfg = cfgs[preset_w.value].replace(kv_lora_rank=rank_w.value, qk_rope_head_dim=rope_w.value)
        summary.value = f"<code>{kv_rank_summary(cfg, groups_w.value)}</code>"
        show_figure(out, plot_kv_vs_rank(cfg, gqa_groups=groups_w.value))

    def on_preset(change):
        cfg = cfgs[change["new"]]
        busy[0] = True
        try:
            groups_w.max = cfg.n_heads
            groups_w.value = min(8, cfg.n_heads)
            rank_w.value = cfg.kv_lora_rank
            rope_w.value = cfg.qk_rope_head_dim
        finally:
            busy[0] = False
        redraw()

    preset_w.observe(on_preset, names="value")
    for widget in (rank_w, rope_w, groups_w):
        widget.observe(redraw, names="value")
    redraw()
    return w.VBox([w.HBox([preset_w, groups_w]), w.HBox([rank_w, rope_w]), summary, out])


def plan_summary(result: dict) -> str:
    """One line of a :func:`dsv3lab.plan.plan` result: fits, total, step time, GPU-hours per 10^12 tokens."""
    per = result["per_gpu_bytes"]
    verdict = "fits" if result["fits"] else "does not fit"
    return (
        f"{verdict}: {per['total'] / 1e9:.1f} of {result['gpu_mem_bytes'] / 1e9:.1f} GB on rank "
        f"{result['fullest_rank']}; step {result['step_s']:.1f} s, "
        f"{result['gpu_hours_per_trillion_tokens'] / 1e3:.0f}K GPU-hours per 10^12 tokens at MFU {result['mfu']:.1%}"
        + ("" if result["fits"] else " — " + "; ".join(result["explanation"][1:]))
    )


def plan_explorer(preset: str = "671B", gpu: str = "H800", recipe: str = "paper"):
    """Sliders for GPUs, PP, EP, ZeRO, micro-batch and sequence length; redraws :func:`plot_plan_memory` for that
    layout beside the paper's (PP16 DualPipe, EP64, ZeRO-1 on 2048 GPUs) and a summary line, or the error of an
    impossible layout. Returns the widget."""
    import ipywidgets as w

    cfg = ModelConfig.preset(preset)
    reference = plan(cfg, PAPER_TRAINING, gpu=gpu, rec=recipe) if preset == "671B" else None
    gpus_w = w.SelectionSlider(options=[2**k for k in range(13)], value=2048, description="GPUs")
    pp_w = w.SelectionSlider(options=[1, 2, 4, 8, 16, 32], value=16, description="PP")
    ep_w = w.SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64, 128, 256], value=64, description="EP")
    zero_w = w.IntSlider(value=1, min=0, max=3, description="ZeRO")
    mb_w = w.SelectionSlider(options=[1, 2, 4, 8], value=1, description="micro-batch")
    seq_w = w.SelectionSlider(options=[1024, 2048, 4096, 8192, 16384, 32768], value=4096, description="sequence")
    summary = w.HTML()
    out = w.Output()

    @redraws
    def update(*_):
        layout = Layout(
            gpus=gpus_w.value, pp=pp_w.value, ep=ep_w.value, zero=zero_w.value, micro_batch=mb_w.value, seq=seq_w.value
        )
        try:
            result = plan(cfg, layout, gpu=gpu, rec=recipe)
        except ValueError as err:
            summary.value = f"<code>{err}</code>"
            return
        summary.value = f"<code>{plan_summary(result)}</code>"
        plans = {"this layout": result} | ({"paper's layout": reference} if reference else {})
        show_figure(out, plot_plan_memory(plan_table(plans)))

    for widget in (gpus_w, pp_w, ep_w, zero_w, mb_w, seq_w):
        widget.observe(update, names="value")
    update()
    return w.VBox([w.HBox([gpus_w, pp_w, ep_w]), w.HBox([zero_w, mb_w, seq_w]), summary, out])


YARN_FACTORS = [2, 4, 8, 16, 32, 40, 64, 80, 128]
YARN_BETAS = [2, 4, 8, 16, 32, 64, 128]
YARN_ALPHAS = [1, 2, 4, 8]


def yarn_config(base: ModelConfig, s: float, beta: int, alpha: int) -> ModelConfig:
    """``base`` with YaRN scale ``s`` (the context stretched to s × ``original_seq_len``), β = ``beta_fast`` and
    α = ``beta_slow``. Raises ``ValueError`` (from the config) when β <= α."""
    return base.replace(
        rope_factor=float(s), max_seq_len=math.ceil(s * base.original_seq_len), beta_fast=beta, beta_slow=alpha
    )


def yarn_summary(cfg: ModelConfig) -> str:
    """One line: the ramp [low, high] that β and α give, how many pairs keep, blend and interpolate their frequency,
    √t = 0.1·ln s + 1 (applied as mscale² to the softmax scale) and the longest wavelength after YaRN."""
    low, high = yarn_correction_range(cfg)
    pairs = cfg.qk_rope_head_dim // 2
    sqrt_t = 0.1 * cfg.mscale * math.log(cfg.rope_factor) + 1
    longest = 2 * math.pi / float(rope_frequencies(cfg).min())
    return (
        f"s={cfg.rope_factor:g}, β={cfg.beta_fast}, α={cfg.beta_slow} → ramp [{low}, {high}]: "
        f"pairs 0–{low} keep θ_i, {max(high - low - 1, 0)} blend, {max(pairs - high, 0)} are divided by s; "
        f"√t = {sqrt_t:.3f} (softmax scale ×{sqrt_t**2:.3f}); longest wavelength {longest:,.0f} tokens "
        f"for a {cfg.max_seq_len:,}-token context"
    )


def yarn_explorer(preset: str = "671B"):
    """Sliders for YaRN's scale s (``rope_factor``), β (``beta_fast``) and α (``beta_slow``) on ``preset``'s rotary
    width and original context; redraws :func:`plot_yarn` and a one-line :func:`yarn_summary`. Returns the widget
    (``.children``: [s, β, α], summary, plot)."""
    import ipywidgets as w

    base = ModelConfig.preset(preset)
    s0 = base.rope_factor if base.yarn_enabled and base.rope_factor in YARN_FACTORS else 40
    s_w = w.SelectionSlider(options=YARN_FACTORS, value=s0, description="s")
    beta_w = w.SelectionSlider(options=YARN_BETAS, value=32, description="β (beta_fast)")
    alpha_w = w.SelectionSlider(options=YARN_ALPHAS, value=1, description="α (beta_slow)")
    summary = w.HTML()
    out = w.Output()

    @redraws
    def redraw(*_):
        if beta_w.value <= alpha_w.value:
            summary.value = f"<code>β must be larger than α (got β={beta_w.value}, α={alpha_w.value})</code>"
            out.outputs = ()
            return
        cfg = yarn_config(base, s_w.value, beta_w.value, alpha_w.value)
        summary.value = f"<code>{yarn_summary(cfg)}</code>"
        show_figure(out, plot_yarn(cfg))

    for widget in (s_w, beta_w, alpha_w):
        widget.observe(redraw, names="value")
    redraw()
    return w.VBox([w.HBox([s_w, beta_w, alpha_w]), summary, out])


ACC_BITS = list(range(10, 25))
PROMOTION_INTERVALS = [32, 64, 128, 256, 512, 1024, 2048, 4096]


def accumulation_summary(sweep: pd.DataFrame, metric: str = "max_rel_error") -> str:
    """One line from an :func:`~dsv3lab.fp8.accum.accumulation_sweep` table: the error at the largest K without
    promotion and with it."""
    at_k = sweep[sweep["K"] == sweep["K"].max()]
    by = at_k.groupby("promotion", sort=False)[metric].mean()
    parts = [f"{label}: {value:.2e}" for label, value in by.items()]
    bits = int(sweep["acc_bits"].iloc[0])
    return f"{bits}-bit accumulator, K = {int(at_k['K'].iloc[0])}, {metric} — " + ", ".join(parts)


def accumulation_explorer(ks=(256, 512, 1024, 2048, 4096), m: int = 8, n: int = 8, seed: int = 0):
    """Sliders for the accumulator's bits and the promotion interval N_C, and the operands' distribution; each change
    reruns :func:`~dsv3lab.fp8.accum.accumulation_sweep` on an m × n emulated GEMM (a fraction of a second) and
    redraws :func:`plot_accumulation_vs_k` with an :func:`accumulation_summary` line. Returns the widget
    (``.children``: [bits, N_C, dist], summary, plot)."""
    import ipywidgets as w

    bits_w = w.SelectionSlider(options=ACC_BITS, value=14, description="acc bits")
    nc_w = w.SelectionSlider(options=PROMOTION_INTERVALS, value=N_C, description="N_C")
    dist_w = w.Dropdown(options=["positive", "normal"], value="positive", description="operands")
    summary = w.HTML()
    out = w.Output()

    @redraws
    def redraw(*_):
        sweep = accumulation_sweep(
            ks=tuple(ks),
            m=m,
            n=n,
            acc_bits=bits_w.value,
            promote_every=nc_w.value,
            dists=(dist_w.value,),
            seeds=(seed,),
        )
        summary.value = f"<code>{accumulation_summary(sweep)}</code>"
        paper = 0.02 if bits_w.value == 14 else None  # the paper: ~2% at K = 4096 with 14 bits
        show_figure(out, plot_accumulation_vs_k(sweep, dist=dist_w.value, paper=paper))

    for widget in (bits_w, nc_w, dist_w):
        widget.observe(redraw, names="value")
    redraw()
    return w.VBox([w.HBox([bits_w, nc_w, dist_w]), summary, out])


def pipeline_summary(name: str, pp: int, n_micro: int, costs) -> str:
    """One line: the simulated bubble, activations and devices against Table 2's row."""
    t = simulate(make_schedule(name, pp, n_micro), costs).summary()
    row = table2(name, pp, costs)
    return (
        f"{name}: makespan {t['makespan']:.3g}, bubble {t['bubble']:.3g} per device (Table 2 "
        f"{TABLE2_FORMULAS[name][0]} = {row['bubble']:.3g}), activations {t['activation_peak']} "
        f"(Table 2 {row['activation']}), parameters {t['param_copies']}×, {t['devices']} devices"
    )


def pipeline_explorer(schedule: str = "dualpipe", pp: int = 8, n_micro: int = 20):
    """Controls for the schedule, PP, micro-batches, F, B, W, the all-to-all per chunk and whether F&B pairs hide it;
    redraws :func:`dsv3lab.viz.pipeline.plot_gantt` of the simulated timeline and a summary against Table 2.
    Impossible combinations (DualPipe needs an even count >= 2·PP) show the error instead. Notebook: 08_dualpipe."""
    import ipywidgets as w

    name_w = w.Dropdown(options=list(SCHEDULES), value=schedule, description="schedule")
    pp_w = w.IntSlider(value=pp, min=2, max=16, step=2, description="PP")
    m_w = w.IntSlider(value=n_micro, min=2, max=48, step=2, description="micro-batches")
    f_w = w.FloatSlider(value=1.0, min=0.2, max=3.0, step=0.1, description="F")
    b_w = w.FloatSlider(value=2.0, min=0.2, max=6.0, step=0.1, description="B (full)")
    w_w = w.FloatSlider(value=1.0, min=0.0, max=3.0, step=0.1, description="W")
    a2a_w = w.FloatSlider(value=0.0, min=0.0, max=3.0, step=0.1, description="all-to-all")
    overlap_w = w.Checkbox(value=True, description="F&B hides the all-to-all")
    summary = w.HTML()
    out = w.Output()

    @redraws
    def update(*_):
        try:
            costs = Costs(
                f=f_w.value, b=b_w.value, w=min(w_w.value, b_w.value), a2a=a2a_w.value, overlap=overlap_w.value
            )
            timeline = simulate(make_schedule(name_w.value, pp_w.value, m_w.value), costs)
            summary.value = f"<code>{pipeline_summary(name_w.value, pp_w.value, m_w.value, costs)}</code>"
        except ValueError as err:
            summary.value = f"<code>{err}</code>"
            out.outputs = ()
            return
        show_figure(out, plot_gantt(timeline, labels=m_w.value <= 24))

    for widget in (name_w, pp_w, m_w, f_w, b_w, w_w, a2a_w, overlap_w):
        widget.observe(update, names="value")
    update()
    return w.VBox([w.HBox([name_w, pp_w, m_w]), w.HBox([f_w, b_w, w_w]), w.HBox([a2a_w, overlap_w]), summary, out])


BIAS_GAMMAS = [0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


def bias_update_summary(counts, bias, gamma: float, rule: str, window: int = 10, target: float = 0.5) -> str:
    """One line from :func:`~dsv3lab.balance.simulate_bias_update`'s counts and bias [steps, E]: γ beside the paper's,
    MaxVio at the first update and over the last ``window``, the first update whose MaxVio is under ``target``, and
    Σ b_i at the end."""
    vio = max_violation(counts)
    under = (vio < target).nonzero()
    first = f"first under {target:g} after update {int(under[0])}" if len(under) else f"never under {target:g}"
    paper = "the paper's γ" if gamma == PAPER_GAMMA else f"{gamma / PAPER_GAMMA:g}× the paper's {PAPER_GAMMA:g}"
    return (
        f"γ = {gamma:g} ({paper}), rule {rule}: MaxVio {float(vio[0]):.2f} at the first update, "
        f"{float(vio[-window:].mean()):.2f} over the last {window} of {len(vio)}; {first}; "
        f"Σ b_i = {float(bias[-1].sum()):+.3f}"
    )


def bias_update_explorer(scores, k: int, gamma: float = PAPER_GAMMA, rule: str = "sign"):
    """A γ slider and a rule picker over the bias update of a fixed router: ``scores`` [steps, T, E] are its
    affinities, ``k`` its top-K. Each change reruns :func:`~dsv3lab.balance.simulate_bias_update` (milliseconds for
    a few hundred updates of a small batch) and redraws :func:`plot_bias_update` with a :func:`bias_update_summary`
    line. Returns the widget (``.children``: [γ, rule], summary, plot)."""
    import ipywidgets as w

    if gamma not in BIAS_GAMMAS:
        raise ValueError(f"gamma must be one of {BIAS_GAMMAS}, got {gamma}")
    if rule not in BIAS_RULES:
        raise ValueError(f"rule must be one of {BIAS_RULES}, got {rule!r}")
    gamma_w = w.SelectionSlider(options=[(f"{g:g}", g) for g in BIAS_GAMMAS], value=gamma, description="γ")
    rule_w = w.Dropdown(options=list(BIAS_RULES), value=rule, description="rule")
    summary = w.HTML()
    out = w.Output()

    @redraws
    def redraw(*_):
        counts, bias = simulate_bias_update(scores, k, gamma_w.value, rule_w.value)
        summary.value = f"<code>{bias_update_summary(counts, bias, gamma_w.value, rule_w.value)}</code>"
        show_figure(out, plot_bias_update(counts.numpy(), bias.numpy(), gamma_w.value, rule_w.value))

    for widget in (gamma_w, rule_w):
        widget.observe(redraw, names="value")
    redraw()
    return w.VBox([w.HBox([gamma_w, rule_w]), summary, out])


def load_scrubber(counts: dict[str, np.ndarray], bias: dict[str, np.ndarray], window: int = 5):
    """A run picker and step/layer sliders over :func:`plot_load_step`: ``counts[name]`` and ``bias[name]`` are the
    ``loads.npz`` arrays [steps, MoE layers, experts] of each run. Starts at the last step of the first run.
    Returns the widget (``.children``: [run, step, layer], plot)."""
    import ipywidgets as w

    if not counts or set(counts) != set(bias):
        raise ValueError(f"counts and bias must name the same runs, got {sorted(counts)} and {sorted(bias)}")
    names = list(counts)
    steps, layers = counts[names[0]].shape[0], bias[names[0]].shape[1]
    run_w = w.Dropdown(options=names, value=names[0], description="run")
    step_w = w.IntSlider(value=steps - 1, min=0, max=steps - 1, description="step")
    layer_w = w.IntSlider(value=0, min=0, max=layers - 1, description="MoE layer")
    out = w.Output()

    @redraws
    def redraw(*_):
        c, b = counts[run_w.value], bias[run_w.value]
        step, layer = min(step_w.value, c.shape[0] - 1), min(layer_w.value, b.shape[1] - 1)
        show_figure(out, plot_load_step(c, b, step, layer, window=window, name=run_w.value))

    for widget in (run_w, step_w, layer_w):
        widget.observe(redraw, names="value")
    redraw()
    return w.VBox([w.HBox([run_w, step_w, layer_w]), out])


def eplb_explorer(weight, num_groups: int, layer: int = 0):
    """Sliders for nodes, GPUs per node and redundant slots per GPU (and the policy) over the EPLB balance figure
    (:func:`dsv3lab.viz.expert_parallel.plot_gpu_loads`) of one layer of ``weight`` [L, E] expert loads: the
    contiguous placement (when the experts split evenly over the GPUs) against EPLB's plan. Returns the widget
    (``.children``: [nodes, GPUs], [spares, policy], summary, plot). Notebook: 09_expert_parallel."""
    import ipywidgets as w

    weight = torch.as_tensor(weight).double()
    n_log = weight.shape[1]
    nodes_w = w.IntSlider(value=2, min=1, max=8, description="nodes")
    gpus_w = w.IntSlider(value=4, min=1, max=8, description="GPUs/node")
    extra_w = w.IntSlider(value=1, min=0, max=4, description="extra slots/GPU")
    policy_w = w.Dropdown(options=["auto", "hierarchical", "global"], value="auto", description="policy")
    summary = w.HTML()
    out = w.Output()

    @redraws
    def redraw(*_):
        nodes, gpus = nodes_w.value, nodes_w.value * gpus_w.value
        replicas = gpus * (-(-n_log // gpus) + extra_w.value)  # enough slots for every expert, plus the extras
        policy = resolve_policy(policy_w.value, num_groups, nodes)
        if policy == "hierarchical" and num_groups % nodes:
            summary.value = f"<code>the hierarchical policy needs nodes to divide the {num_groups} groups</code>"
            return
        phy2log = rebalance_experts(weight[layer : layer + 1], replicas, num_groups, nodes, gpus, policy)[0][0]
        plans = {f"{policy} ({replicas} slots)": phy2log}
        if n_log % gpus == 0:
            plans = {"before (contiguous)": contiguous_placement(1, n_log)[0], **plans}
        summary.value = f"<code>{n_log} experts, {replicas} slots on {nodes} nodes × {gpus_w.value} GPUs</code>"
        show_figure(out, plot_gpu_loads(weight[layer], plans, gpus))

    for widget in (nodes_w, gpus_w, extra_w, policy_w):
        widget.observe(redraw, names="value")
    redraw()
    return w.VBox([w.HBox([nodes_w, gpus_w]), w.HBox([extra_w, policy_w]), summary, out])
