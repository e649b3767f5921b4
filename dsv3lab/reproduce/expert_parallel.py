"""C13 ``expert_parallel``: expert parallelism measured — the EP layer against one process, the traffic of
node-limited routing (671B shapes and a trained toy model), and EPLB's balance before and after rebalancing on the
suite's training loads and on skewed synthetic loads, with how fast a plan ages.

Reuses E1's runs (``aux_free`` and ``none``, seed 0) from the run cache. Paper: §2.1.2, §3.2.2, §3.4.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from ..config import ModelConfig
from ..parallel.eplb import balance_report, drift_summary, rebalance_drift, synthetic_loads
from ..parallel.expert import run_ep_check
from ..parallel.traffic import (
    Topology,
    combine_bytes,
    dispatch_bytes,
    model_routing,
    nodes_per_token,
    same_ib_cost,
    synthetic_routing,
    token_traffic,
    traffic_summary,
)
from ..train.experiments import RunCache, suite_config
from ..viz.expert_parallel import plot_balance, plot_drift, plot_nodes_per_token, plot_placement, plot_traffic_vs_k
from . import Context, Result, experiment

# (replicas, nodes, GPUs) for the toy model's 16 experts in 4 groups, and for the 671B model's 256 in 8 groups
TOY_LAYOUTS = [(16, 2, 4), (24, 2, 4), (24, 2, 8), (32, 4, 8), (32, 8, 8)]
V3_LAYOUTS = [(256, 8, 64), (320, 8, 64), (288, 4, 32), (320, 40, 320)]
DRIFT_SPEEDS = (0.02, 0.05, 0.1, 0.2)  # σ of the per-step random walk of the log expert popularities


def _distribution(indices: torch.Tensor, topo: Topology, label: str) -> pd.DataFrame:
    nodes = nodes_per_token(indices, topo)
    frac = torch.bincount(nodes, minlength=topo.n_nodes + 1).double() / nodes.numel()
    return pd.DataFrame({"routing": label, "nodes": np.arange(len(frac)), "fraction": frac.numpy()})


def _traffic_rows(indices: torch.Tensor, topo: Topology, dim: int, **labels) -> dict:
    k = indices.shape[1]
    return {**labels, "k": k, **traffic_summary(token_traffic(indices, topo, dim), topo, k)}


def _traffic_md(rows: list[tuple[str, dict]]) -> str:
    cols = ["nodes", "gpus", "ib_copies", "nvlink_copies"]
    byte_cols = ["dispatch_ib_bytes", "dispatch_nvlink_bytes", "combine_ib_bytes", "combine_nvlink_bytes"]
    lines = [
        "| routing | nodes / token | GPUs / token | IB copies | NVLink copies | dispatch IB B | dispatch NVLink B "
        "| combine IB B | combine NVLink B |",
        "|---|" + "---:|" * 8,
    ]
    for label, r in rows:
        cells = [f"{r[c]:.2f}" for c in cols] + [f"{r[c]:,.0f}" for c in byte_cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _balance_table(weight: torch.Tensor, layouts, groups: int, source: str) -> pd.DataFrame:
    rows = []
    for replicas, nodes, gpus in layouts:
        row = {"source": source, "config": f"{replicas} slots / {nodes} nodes / {gpus} GPUs"}
        row.update(replicas=replicas, nodes=nodes, gpus=gpus)
        policies = ["hierarchical", "global"] if groups % nodes == 0 else ["global"]
        for policy in policies:
            r = balance_report(weight, replicas, groups, nodes, gpus, policy=policy)
            row["before"], row["before_node"] = r["before"], r["before_node"]
            row[policy], row[f"{policy}_node"] = r["after"], r["after_node"]
        row["auto"] = "hierarchical" if groups % nodes == 0 else "global"
        rows.append(row)
    return pd.DataFrame(rows)


def _records(df: pd.DataFrame) -> list[dict]:
    """Rows as dicts with None for NaN (summary.json stays strict JSON)."""
    return [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
        for row in df.to_dict("records")
    ]


@experiment("expert_parallel", "C13: expert parallelism: EP = one process, node-limited traffic, EPLB balance")
def run(ctx: Context) -> Result:
    fast = ctx.fast
    files = []

    # 1. the EP layer against one process, real gloo ranks
    ep_rows = []
    for world in (2,) if fast else (2, 4):
        out = run_ep_check(nproc=world, preset="tiny", batch=2, seq_len=16, replicas=16)
        for r in out:
            ep_rows.append({"ranks": world, "rank": r["rank"], **r["max_abs_diff"], "pairs": sum(r["pairs"])})
    ep_table = pd.DataFrame(ep_rows)
    ep_table.to_csv(ctx.out / "expert_parallel_ep.csv", index=False)
    files.append("expert_parallel_ep.csv")

    # 2. traffic at the 671B shapes (synthetic scores) and on a trained toy model's routing
    v3 = ModelConfig.preset("671B")
    v3_topo = Topology.for_config(v3, gpus_per_node=8)
    n_tok = 1024 if fast else 4096
    m = v3.n_limited_groups
    limited = synthetic_routing(v3, n_tok, seed=0)
    free = synthetic_routing(v3, n_tok, n_limited_groups=v3.n_expert_groups, seed=0)
    dist_rows = [_distribution(limited, v3_topo, "671B, M = 4"), _distribution(free, v3_topo, "671B, no limit")]
    traffic_rows = [
        _traffic_rows(limited, v3_topo, v3.dim, model="671B synthetic", routing="node-limited (M = 4)"),
        _traffic_rows(free, v3_topo, v3.dim, model="671B synthetic", routing="no limit"),
    ]
    sweep = pd.DataFrame(
        [
            _traffic_rows(synthetic_routing(v3, n_tok // 2, n_activated_experts=k, seed=k), v3_topo, v3.dim)
            for k in range(8, 17)
        ]
    )
    crossover = sweep[sweep.t_nvlink_us > sweep.t_ib_us].k
    hidden_k = int(crossover.min()) - 1 if len(crossover) else int(sweep.k.max())
    paper = same_ib_cost(v3_topo, m)

    cache = RunCache(log=ctx.log)
    seed = ctx.seeds[0]
    runs = {v: cache.run(suite_config(v, seed, fast, device=str(ctx.device))) for v in ("aux_free", "none")}
    toy = runs["aux_free"]
    toy_cfg = toy.model_cfg
    toy_topo = Topology.for_config(toy_cfg, gpus_per_node=2)
    val = cache.data(toy.train_cfg).val
    rows = torch.cat([v[: 4 if fast else 8, :-1] for v in val.values()])
    toy_limited = model_routing(toy.model, rows)
    toy_free = model_routing(toy.model, rows, n_limited_groups=toy_cfg.n_expert_groups)
    for layer, (a, b) in enumerate(zip(toy_limited, toy_free)):
        toy_m = f"node-limited (M = {toy_cfg.n_limited_groups})"
        traffic_rows.append(_traffic_rows(a, toy_topo, toy_cfg.dim, model=f"toy layer {layer}", routing=toy_m))
        traffic_rows.append(_traffic_rows(b, toy_topo, toy_cfg.dim, model=f"toy layer {layer}", routing="no limit"))
    dist_rows.append(_distribution(torch.cat(toy_limited), toy_topo, f"toy, M = {toy_cfg.n_limited_groups}"))
    dist_rows.append(_distribution(torch.cat(toy_free), toy_topo, "toy, no limit"))
    traffic = pd.DataFrame(traffic_rows)
    nodes = pd.concat(dist_rows, ignore_index=True)
    traffic.to_csv(ctx.out / "expert_parallel_traffic.csv", index=False)
    nodes.to_csv(ctx.out / "expert_parallel_nodes.csv", index=False)
    sweep.to_csv(ctx.out / "expert_parallel_k_sweep.csv", index=False)
    files += ["expert_parallel_traffic.csv", "expert_parallel_nodes.csv", "expert_parallel_k_sweep.csv"]
    max_nodes_limited = int(nodes[(nodes.fraction > 0) & nodes.routing.str.contains("M =")].nodes.max())

    # 3. EPLB: balance before/after on training loads and synthetic loads, and how fast a plan ages
    n_main = toy_cfg.n_moe_layers
    window = 5 if fast else 10
    balance = []
    drift = []
    for variant, r in runs.items():
        counts = torch.as_tensor(r.loads["counts"][:, :n_main]).double()  # [steps, L, E]
        table = _balance_table(counts[-window:].mean(0), TOY_LAYOUTS, toy_cfg.n_expert_groups, f"toy {variant}")
        balance.append(table)
        d = rebalance_drift(
            counts,
            24,
            toy_cfg.n_expert_groups,
            2,
            8,
            window=window,
            horizon=10 if fast else 30,
            stride=5 if fast else 10,
        )
        drift.append(d.assign(source=f"toy {variant}"))
    layers = 8 if fast else 58  # the 671B model's MoE layers
    for skew in (0.5, 1.0):
        w = synthetic_loads(layers, v3.n_routed_experts, skew, seed=0)
        balance.append(_balance_table(w, V3_LAYOUTS, v3.n_expert_groups, f"synthetic σ = {skew}"))
    horizon = 20 if fast else 40
    for speed in DRIFT_SPEEDS:  # expected loads (no sampling noise) whose log-popularities walk at this speed
        walk = synthetic_loads(4 if fast else 8, v3.n_routed_experts, 1.0, seed=1, steps=horizon + 11, drift=speed)
        d = rebalance_drift(walk, 320, v3.n_expert_groups, 8, 64, window=1, horizon=horizon, stride=10)
        drift.append(d.assign(source=f"synthetic σ = 1, drift {speed:g}/step"))
    balance = pd.concat(balance, ignore_index=True)
    drift = pd.concat(drift, ignore_index=True)
    balance.to_csv(ctx.out / "expert_parallel_balance.csv", index=False)
    drift.to_csv(ctx.out / "expert_parallel_drift.csv", index=False)
    files += ["expert_parallel_balance.csv", "expert_parallel_drift.csv"]
    aging = pd.DataFrame([{"source": src, **drift_summary(d)} for src, d in drift.groupby("source", sort=False)])
    aging.to_csv(ctx.out / "expert_parallel_aging.csv", index=False)
    files.append("expert_parallel_aging.csv")

    # figures
    fig, axes = plt.subplots(1, 3, figsize=(17, 3.8))
    plot_nodes_per_token(
        nodes[nodes.routing.str.startswith("671B")],
        ax=axes[0],
        limit=m,
        title="671B routing (synthetic scores): nodes per token",
    )
    plot_nodes_per_token(
        nodes[nodes.routing.str.startswith("toy")],
        ax=axes[1],
        limit=toy_cfg.n_limited_groups,
        title="trained toy model: nodes per token",
    )
    plot_traffic_vs_k(sweep, ax=axes[2], same_cost=paper["max_experts"])
    axes[2].set_title("671B: NVLink hidden behind IB up to K ≈ " + str(hidden_k))
    fig.tight_layout()
    fig.savefig(ctx.out / "expert_parallel_traffic.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(2, 2, figsize=(15, 8))
    toy_bal = balance[balance.source == "toy aux_free"]
    plot_balance(toy_bal, ax=axes[0, 0], title=f"toy aux_free run, last {window} steps' loads: max/mean per GPU")
    syn = balance[balance.source == "synthetic σ = 1.0"]
    plot_balance(syn, ax=axes[0, 1], title="671B shapes, log-normal loads (σ = 1): max/mean per GPU")
    plot_drift(
        drift[drift.source == "toy none"],
        ax=axes[1, 0],
        title="toy `none` run: a plan (24 slots, 2 nodes, 8 GPUs) ages",
    )
    w0 = synthetic_loads(1, 16, 1.0, seed=3)[0]
    plan0 = balance_report(w0[None], 24, 4, 2, 8)["phy2log"][0]
    plot_placement(w0, plan0, 8, 2, ax=axes[1, 1])
    axes[1, 1].set_title("16 experts (σ = 1), 24 slots, 2 nodes × 4 GPUs — " + axes[1, 1].get_title())
    fig.tight_layout()
    fig.savefig(ctx.out / "expert_parallel_eplb.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    files += ["expert_parallel_traffic.png", "expert_parallel_eplb.png"]

    # report
    lim, fr = traffic_rows[0], traffic_rows[1]
    ib_saving = 1 - lim["dispatch_ib_bytes"] / fr["dispatch_ib_bytes"]
    ep_max = ep_table[["logits", "loss", "grad", "bias", "logits_replicated"]].max()
    toy_tr = traffic[traffic.model.str.startswith("toy")].groupby("routing", sort=False)[["nodes", "ib_copies"]].mean()

    def fmt_table(df: pd.DataFrame) -> str:
        lines = [
            "| loads | slots / nodes / GPUs | before | hierarchical | global | nodes: before → hier. / global |",
            "|---|---|---:|---:|---:|---|",
        ]
        for _, r in df.iterrows():
            hier = f"{r['hierarchical']:.3f}" if "hierarchical" in r and pd.notna(r.get("hierarchical")) else "—"
            hn = f"{r['hierarchical_node']:.3f}" if pd.notna(r.get("hierarchical_node", np.nan)) else "—"
            before = f"{r.before:.3f}" if pd.notna(r.before) else "—"
            bn = f"{r.before_node:.3f}" if pd.notna(r.before_node) else "—"
            lines.append(
                f"| {r.source} | {r.replicas} / {r.nodes} / {r.gpus} | {before} | {hier} | {r['global']:.3f} "
                f"| {bn} → {hn} / {r.global_node:.3f} |"
            )
        return "\n".join(lines)

    def fmt_aging(df: pd.DataFrame) -> str:
        lines = [
            "| loads | kept plan, h = 0 → last | re-planned every step (mean) | no rebalancing, h = 0 → last "
            "| 10 % worse than at h = 0 after |",
            "|---|---|---:|---|---|",
        ]
        for _, r in df.iterrows():
            aged = f"{r.aged_after:.0f} steps" if pd.notna(r.aged_after) else f"> {r.horizon - 1} steps"
            lines.append(
                f"| {r.source} | {r.after_h0:.3f} → {r.after_last:.3f} | {r.fresh:.3f} "
                f"| {r.before_h0:.3f} → {r.before_last:.3f} | {aged} |"
            )
        return "\n".join(lines)

    worlds = ", ".join(str(w) for w in sorted(ep_table.ranks.unique()))
    report = f"""## C13 — Expert parallelism: EP = one process, node-limited traffic, EPLB balance

**Paper** (§2.1.2, §3.2.2, §3.4): the 256 routed experts run on 64 GPUs of 8 nodes (EP64); node-limited routing
sends each token to at most M = 4 nodes, and since NVLink (160 GB/s) is 3.2× faster than IB (50 GB/s), "each token
can efficiently select an average of 3.2 experts per node", so up to 4 × 3.2 ≈ 13 experts could be chosen "while
preserving the same communication cost". At inference, redundant experts (32 for prefill) re-chosen from online
statistics balance the GPUs (DeepSeek's EPLB; no balance figure is published).

**EP equals one process.** `dsv3lab.parallel.ExpertParallelMoE` on {worlds} real gloo ranks (`tiny` preset, MoE
layers of the main model and the MTP block sharded, one training step): largest |difference| against the same model
in one process on the union of the batches — logits {ep_max.logits:.1e}, loss {ep_max.loss:.1e}, gradients
{ep_max.grad:.1e}, selection bias after the aux-loss-free update {ep_max.bias:.1e}; with 16 slots (EPLB replicas of
the hottest experts) the logits change by {ep_max.logits_replicated:.1e}.

**Node-limited routing** (671B router shapes, fresh centroids N(0, 0.006), {n_tok} N(0, 1) tokens; 8 nodes × 8 GPUs,
4 experts per GPU; dispatch FP8 {dispatch_bytes(v3.dim):,} B and combine BF16 {combine_bytes(v3.dim):,} B per copy;
tokens spread evenly over the 64 GPUs):

{_traffic_md([("M = 4", lim), ("no limit", fr)])}

The limit cuts IB bytes per token by {ib_saving:.0%}; the most nodes any token reached with the limit, over both
models: {max_nodes_limited} (M = {m} for 671B, {toy_cfg.n_limited_groups} for the toy model). The trained toy model
(E1's `aux_free` run, 16 experts in 4 groups on 4 nodes × 2 GPUs, validation text): {toy_tr.iloc[0].nodes:.2f} nodes
and {toy_tr.iloc[0].ib_copies:.2f} IB copies per token with M = {toy_cfg.n_limited_groups}, {toy_tr.iloc[1].nodes:.2f}
and {toy_tr.iloc[1].ib_copies:.2f} when its router may use every group.

**3.2 experts per node, 13 experts.** In this traffic model 3.2 is the bandwidth ratio 160 / 50, the NVLink
copies a landing GPU can forward in the time of one IB copy: a capacity, not an average that routing produces. At
K = 8 a token uses {lim["experts_per_node"]:.2f} experts per node it reaches. Raising K under the same limit
(K = 8 … 16, table `expert_parallel_k_sweep.csv`), IB copies stay at {sweep.ib_copies.min():.2f}–
{sweep.ib_copies.max():.2f} per token while NVLink copies grow; NVLink stays hidden behind IB up to
**K = {hidden_k}** (the paper's arithmetic: 4 × 3.2 = {paper["max_experts"]:.1f}, "up to 13"). The margin comes
from copies this model does not send: a token's own node needs no IB copy (so IB takes
{sweep.ib_copies.mean():.2f}, not 4, copies), a landing GPU that holds an expert needs no NVLink copy, and two
experts on one GPU share a copy. Verdict: **the bound of M nodes holds exactly; "up to 13 experts at the same IB
cost" is reproduced by the model (K = {hidden_k} with these assumptions, 12.8 with the paper's)**; the "3.2 experts
per node" is the bandwidth ratio, while routing at K = 8 uses about {lim["experts_per_node"]:.0f}.

![traffic](expert_parallel_traffic.png)

**EPLB balance** — max/mean load per GPU (1 = balanced; the step waits for the busiest GPU), mean over MoE layers;
*before* = experts placed contiguously without redundancy; per-node max/mean in the last column. Training loads: the
mean of the last {window} steps of E1's runs (seed {seed}); synthetic: log-normal expert popularity, {layers} layers,
the 671B layouts (EP64 training, EP64 with 64 redundant, prefill EP32 with 32 redundant, decode EP320):

{fmt_table(balance)}

**How often must it run?** A plan is made from a window of loads and kept while the loads move on (tables
`expert_parallel_drift.csv`, `expert_parallel_aging.csv`; h = steps since the plan). Toy runs: planned on the mean
of {window} steps (24 slots, 2 nodes, 8 GPUs), measured on each later step's own loads; synthetic: 671B EP64 with 64
redundant experts, expected loads (no sampling noise) whose log-popularities take a random walk of the given σ per
step, planned on the current loads. "10 % worse": the first h at which the kept plan's max/mean exceeds its value
at h = 0 by 10 %:

{fmt_aging(aging)}

Verdict: **EPLB brings max/mean per GPU from {toy_bal.before.iloc[2]:.2f} to
{min(toy_bal["hierarchical"].iloc[2], toy_bal["global"].iloc[2]):.2f} on the toy run's loads (24 slots, 8 GPUs) and
from {syn.before.iloc[1]:.2f} to {syn["global"].iloc[1]:.2f} (global) / {syn["hierarchical"].iloc[1]:.2f}
(hierarchical) for 671B EP64 with 64 redundant experts on σ = 1 loads.** The hierarchical policy keeps each group on
one node (so node-limited routing still bounds IB traffic) but cannot move load between nodes: with one group per
node (toy: 4 groups on 4 nodes; 671B EP64: 8 groups on 8 nodes) the node imbalance is a floor that no replica inside
a node lowers, where the global policy, ignoring groups, balances GPUs and nodes; with two groups per node (671B
prefill, EP32 on 4 nodes) the hierarchical policy comes close to the global one. Without redundant slots (256 on
64 GPUs) the hottest expert bounds the ratio. A kept plan ages at a rate set by how fast the popularities move: how
often to rebalance is a property of the traffic (the paper re-plans every ~10 minutes), and per-step loads of a toy
run are noisy enough that a plan made from a window stays behind one made on the step itself.

![EPLB](expert_parallel_eplb.png)
"""
    summary = {
        "expert_parallel": {
            "ep_max_abs_diff": {k: float(v) for k, v in ep_max.items()},
            "ep_ranks": [int(w) for w in sorted(ep_table.ranks.unique())],
            "nodes_per_token": {"limited": lim["nodes"], "free": fr["nodes"], "max_limited": max_nodes_limited},
            "dispatch_ib_bytes": {"limited": lim["dispatch_ib_bytes"], "free": fr["dispatch_ib_bytes"]},
            "experts_per_node_k8": lim["experts_per_node"],
            "hidden_k": hidden_k,
            "paper_max_experts": paper["max_experts"],
            "balance": _records(balance.drop(columns=["config"])),
            "aging": _records(aging),
        }
    }
    return Result(report, summary, files)
