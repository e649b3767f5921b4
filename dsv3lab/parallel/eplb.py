"""EPLB: the expert-parallel load balancer — redundant experts and their placement on GPUs (DeepSeek-V3 §3.4).

Under expert parallelism every GPU holds a few routed experts, and a step takes as long as its busiest GPU. Routing
is balanced on average (the bias update of §2.1.2), but at inference the load drifts with the traffic, so DeepSeek
serves *redundant experts*: the hottest experts get extra copies (replicas), each copy takes an equal share of its
expert's tokens, and the copies are placed so that every GPU carries about the same load. The paper deploys
32 redundant experts for prefill (EP32: 8 + 1 experts per GPU) and re-chooses them from online statistics every
~10 minutes; DeepSeek's open-source EPLB (github.com/deepseek-ai/EPLB) gives the planner. This module implements the
same interface and policies, written here from the algorithm:

    phy2log, log2phy, logcnt = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)

* ``weight``  [L, E]: the (estimated) load of each logical expert in each of L MoE layers;
* ``phy2log`` [L, num_replicas]: the logical expert held by each physical slot; slot p lives on GPU
  p // (num_replicas / num_gpus), GPU g on node g // (num_gpus / num_nodes);
* ``log2phy`` [L, E, max replicas]: the physical slots of each logical expert (replica rank order), padded with -1;
* ``logcnt``  [L, E]: the number of replicas of each logical expert (>= 1).

**Hierarchical policy** (when ``num_nodes`` divides ``num_groups``: prefill, smaller EP), three greedy steps:

1. pack the expert *groups* onto nodes, the same number of groups per node, balancing node loads — with
   group-limited routing (§2.1.2) a token then still reaches at most M nodes, since a group never straddles nodes;
2. within each node, add the node's share of redundant slots one at a time, each to the expert whose load per
   replica is the largest (this minimises the largest per-replica load);
3. pack the node's replicas (each carrying load / replica count) onto the node's GPUs, the same number per GPU.

**Global policy** (otherwise: decode, larger EP): the same with one group and one node — replicas chosen over all
experts and packed onto all GPUs, ignoring groups.

Both packing steps use the same rule (:func:`balanced_packing`): take the items from heaviest to lightest and put
each on the currently lightest pack that still has room. Ties are broken towards the lower index everywhere (a stable
sort; DeepSeek's code sorts without a stability guarantee, so with exactly equal loads — e.g. two replicas of one
expert — the two may order tied items differently, with the same loads per GPU). This reproduces the mapping printed
in EPLB's README (tested).

Notebook: 09_expert_parallel.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..balance import max_violation

POLICIES = ("auto", "hierarchical", "global")


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the n items of each row into ``num_packs`` packs of n / num_packs items, balancing the packs' sums.

    Greedy, heaviest item first: each goes to the lightest pack that still has room (lowest index on ties). With
    one item per pack there is nothing to balance and item i stays in pack i (as DeepSeek's EPLB: a node keeps its
    group, a GPU its replica, when the counts match).
    weight [X, n] -> (pack [X, n], position in its pack [X, n]), both int64.
    """
    rows, n = weight.shape
    if num_packs < 1 or n % num_packs:
        raise ValueError(f"num_packs must divide the {n} items into equal packs, got {num_packs}")
    per_pack = n // num_packs
    if per_pack == 1:
        return torch.arange(n).repeat(rows, 1), torch.zeros(rows, n, dtype=torch.int64)
    pack = torch.empty(rows, n, dtype=torch.int64)
    position = torch.empty(rows, n, dtype=torch.int64)
    order = torch.argsort(weight, dim=-1, descending=True, stable=True).tolist()  # heaviest first, per row
    values = weight.float().numpy()  # pack sums accumulate in fp32, as the loads are given
    for r in range(rows):
        load = np.zeros(num_packs, dtype=np.float32)
        used = [0] * num_packs
        for item in order[r]:
            p = min((q for q in range(num_packs) if used[q] < per_pack), key=lambda q: load[q])
            pack[r, item], position[r, item] = p, used[p]
            load[p] += values[r, item]
            used[p] += 1
    return pack, position


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give E logical experts ``num_phy`` >= E physical slots: slot i < E holds expert i, and each further slot a
    new replica of the expert whose load per replica is currently the largest (lowest index on ties).

    weight [X, E] -> (phy2log [X, num_phy], replica rank of each slot [X, num_phy], logcnt [X, E]), all int64.
    """
    rows, n_log = weight.shape
    if num_phy < n_log:
        raise ValueError(f"num_phy ({num_phy}) must be >= the number of logical experts ({n_log})")
    phy2log = torch.arange(num_phy).repeat(rows, 1)  # [X, num_phy]; the first E slots: one copy of each expert
    rank = torch.zeros(rows, num_phy, dtype=torch.int64)
    logcnt = torch.ones(rows, n_log, dtype=torch.int64)
    row = torch.arange(rows)
    for slot in range(n_log, num_phy):
        hottest = (weight / logcnt).argmax(dim=-1)  # [X]: the largest load per replica
        phy2log[:, slot] = hottest
        rank[:, slot] = logcnt[row, hottest]
        logcnt[row, hottest] += 1
    return phy2log, rank, logcnt


def _place_layer(w: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int):
    """The hierarchical policy for one layer: w [E] -> (phy2log [num_phy], replica rank [num_phy], logcnt [E])."""
    n_log = w.numel()
    group_size = n_log // num_groups
    phy_per_node = num_phy // num_nodes
    gpus_per_node = num_gpus // num_nodes
    phy_per_gpu = num_phy // num_gpus
    phy2log = torch.empty(num_phy, dtype=torch.int64)
    rank = torch.empty(num_phy, dtype=torch.int64)
    logcnt = torch.empty(n_log, dtype=torch.int64)

    # 1. groups -> nodes (equal group counts, balanced node loads)
    group_load = w.view(num_groups, group_size).sum(-1)  # [G]
    node_of_group, pos_of_group = balanced_packing(group_load[None], num_nodes)
    for node in range(num_nodes):
        groups = sorted((g for g in range(num_groups) if node_of_group[0, g] == node), key=lambda g: pos_of_group[0, g])
        experts = torch.cat([torch.arange(g * group_size, (g + 1) * group_size) for g in groups])  # [E / N] on node
        # 2. redundant replicas of the node's hottest experts
        local2log, local_rank, cnt = replicate_experts(w[experts][None], phy_per_node)  # [1, P/N], [1, P/N], [1, E/N]
        # 3. replicas -> the node's GPUs (each replica carries load / replica count)
        replica_load = (w[experts] / cnt[0])[local2log[0]]  # [P / N]
        gpu, pos = balanced_packing(replica_load[None], gpus_per_node)  # [1, P/N] each
        slot = node * phy_per_node + gpu[0] * phy_per_gpu + pos[0]  # physical index of each replica
        phy2log[slot] = experts[local2log[0]]
        rank[slot] = local_rank[0]
        logcnt[experts] = cnt[0]
    return phy2log, rank, logcnt


def _check(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, policy: str):
    if weight.dim() != 2:
        raise ValueError(f"weight must be [layers, experts], got shape {tuple(weight.shape)}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    n_log = weight.shape[1]
    if (weight < 0).any() or not torch.isfinite(weight).all():
        raise ValueError("weight (expert loads) must be finite and >= 0")
    for name, value in (("num_groups", num_groups), ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_replicas < n_log:
        raise ValueError(f"num_replicas ({num_replicas}) must be >= the number of logical experts ({n_log})")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes})")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus})")
    if n_log % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the {n_log} experts into equal groups")
    if policy == "hierarchical" and num_groups % num_nodes:
        raise ValueError(
            f"the hierarchical policy needs num_nodes ({num_nodes}) to divide num_groups ({num_groups}); "
            "use policy='global' (or 'auto')"
        )


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, policy: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replicate and place the experts of every layer (the interface of DeepSeek's ``eplb.rebalance_experts``).

    weight [L, E] expert loads; ``num_replicas`` physical slots per layer (a multiple of ``num_gpus``);
    ``num_groups`` expert groups; ``num_nodes`` nodes; ``num_gpus`` GPUs (a multiple of ``num_nodes``).
    ``policy``: ``auto`` (DeepSeek's choice: hierarchical when ``num_nodes`` divides ``num_groups``, else global),
    ``hierarchical`` or ``global``.

    Returns ``phy2log`` [L, num_replicas], ``log2phy`` [L, E, max replicas] (padded with -1) and ``logcnt`` [L, E].
    """
    _check(weight, num_replicas, num_groups, num_nodes, num_gpus, policy)
    weight = weight.detach().float().cpu()
    if policy == "global" or (policy == "auto" and num_groups % num_nodes):
        num_groups = num_nodes = 1  # the global policy: one group, one node
    layers = [_place_layer(w, num_replicas, num_groups, num_nodes, num_gpus) for w in weight]
    phy2log = torch.stack([p for p, _, _ in layers])  # [L, P]
    rank = torch.stack([r for _, r, _ in layers])  # [L, P]
    logcnt = torch.stack([c for _, _, c in layers])  # [L, E]
    log2phy = torch.full((weight.shape[0], weight.shape[1], int(logcnt.max())), -1, dtype=torch.int64)
    layer = torch.arange(weight.shape[0])[:, None].expand_as(phy2log)
    log2phy[layer, phy2log, rank] = torch.arange(num_replicas).expand_as(phy2log)  # slot of (expert, replica rank)
    return phy2log, log2phy, logcnt


# ---------------------------------------------------------------------- what a placement does to the GPUs
def contiguous_placement(num_layers: int, num_experts: int) -> torch.Tensor:
    """No rebalancing: slot i holds expert i (expert e on GPU e // (E / num_gpus)) — phy2log [L, E]."""
    return torch.arange(num_experts).repeat(num_layers, 1)


def replica_loads(weight: torch.Tensor, phy2log: torch.Tensor) -> torch.Tensor:
    """The load each physical slot carries: its expert's load divided equally among that expert's replicas.

    weight [L, E], phy2log [L, P] -> [L, P] (float64).
    """
    weight = weight.double()
    logcnt = torch.zeros_like(weight).scatter_add_(1, phy2log, torch.ones_like(phy2log, dtype=weight.dtype))
    return (weight / logcnt.clamp_min(1)).gather(1, phy2log)


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Load per GPU: weight [L, E], phy2log [L, P] -> [L, num_gpus] (slots split contiguously, P / num_gpus each)."""
    loads = replica_loads(weight, phy2log)
    if loads.shape[1] % num_gpus:
        raise ValueError(f"num_gpus ({num_gpus}) must divide the {loads.shape[1]} physical slots")
    return loads.view(loads.shape[0], num_gpus, -1).sum(-1)


def imbalance(loads: torch.Tensor) -> torch.Tensor:
    """max / mean over the last dim (1 = perfectly balanced): the step time of the busiest GPU relative to a
    balanced step. ``1 + MaxVio`` of :func:`dsv3lab.balance.max_violation`."""
    return 1.0 + max_violation(loads)


def resolve_policy(policy: str, num_groups: int, num_nodes: int) -> str:
    """The policy :func:`rebalance_experts` applies: ``auto`` is hierarchical when num_nodes divides num_groups."""
    if policy == "auto":
        return "global" if num_groups % num_nodes else "hierarchical"
    return policy


# ---------------------------------------------------------------------- measured balance (the figure nobody publishes)
def balance_report(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    policy: str = "auto",
    eval_weight: torch.Tensor | None = None,
) -> dict:
    """Max/mean load per GPU and per node, averaged over layers, before rebalancing (contiguous placement, no
    redundant experts; NaN when the experts do not split evenly over the GPUs) and after, the plan made from
    ``weight`` and measured on ``eval_weight`` (default: the same loads). Also returns the plan's ``phy2log``."""
    eval_weight = weight if eval_weight is None else eval_weight
    layers, n_log = weight.shape
    phy2log, _, _ = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, policy)
    after = gpu_loads(eval_weight, phy2log, num_gpus)  # [L, num_gpus]
    out = {
        "policy": resolve_policy(policy, num_groups, num_nodes),
        "after": float(imbalance(after).mean()),
        "after_node": float(imbalance(after.view(layers, num_nodes, -1).sum(-1)).mean()),
        "before": float("nan"),
        "before_node": float("nan"),
        "phy2log": phy2log,
    }
    if n_log % num_gpus == 0:
        before = gpu_loads(eval_weight, contiguous_placement(layers, n_log), num_gpus)
        out["before"] = float(imbalance(before).mean())
        out["before_node"] = float(imbalance(before.view(layers, num_nodes, -1).sum(-1)).mean())
    return out


def rebalance_drift(
    counts, num_replicas, num_groups, num_nodes, num_gpus, *, window=10, horizon=20, stride=5, policy="auto", fresh=True
) -> pd.DataFrame:
    """How a plan ages as the loads drift. ``counts`` [steps, L, E]: per-step expert loads (``loads.npz``); the four
    ints place the experts as in :func:`rebalance_experts`; ``window``, ``horizon``, ``stride``: steps (ints).

    For every start step t (from ``window`` on, every ``stride`` steps, while t + horizon fits): plan on the mean
    load of steps [t − window, t), then measure max/mean per GPU (mean over layers) on each later step t + h, h = 0 …
    horizon − 1. One row per (start, h): ``after`` (the aging plan), ``fresh`` (a plan made on step t + h itself —
    rebalancing every step, the best any plan does on that step) and ``before`` (contiguous, no redundancy; NaN when
    the experts do not split evenly over the GPUs). ``fresh=False`` skips the per-step plans (NaN).
    """
    counts = torch.as_tensor(counts).double()
    steps, layers, n_log = counts.shape
    contiguous = contiguous_placement(layers, n_log)
    rows = []
    for start in range(window, steps - horizon + 1, stride):
        plan = rebalance_experts(
            counts[start - window : start].mean(0), num_replicas, num_groups, num_nodes, num_gpus, policy
        )
        for h in range(horizon):
            step = counts[start + h]
            row = {
                "start": start,
                "h": h,
                "after": float(imbalance(gpu_loads(step, plan[0], num_gpus)).mean()),
                "fresh": float("nan"),
                "before": float("nan"),
            }
            if fresh:
                now = rebalance_experts(step, num_replicas, num_groups, num_nodes, num_gpus, policy)[0]
                row["fresh"] = float(imbalance(gpu_loads(step, now, num_gpus)).mean())
            if n_log % num_gpus == 0:
                row["before"] = float(imbalance(gpu_loads(step, contiguous, num_gpus)).mean())
            rows.append(row)
    return pd.DataFrame(rows)


def drift_summary(drift: pd.DataFrame, worse: float = 1.1) -> dict:
    """From :func:`rebalance_drift`, averaged over start steps: max/mean per GPU of the kept plan at h = 0 and at the
    last h, of a plan made on every step, and without rebalancing (first and last h); ``aged_after``: the first h
    at which the kept plan is ``worse`` (1.1 = 10 %) above its own value at h = 0 (NaN: not within the horizon)."""
    mean = drift.groupby("h")[["after", "before", "fresh"]].mean()
    aged = mean.after >= worse * mean.after.iloc[0]
    return {
        "horizon": int(mean.index.max()) + 1,
        "after_h0": float(mean.after.iloc[0]),
        "after_last": float(mean.after.iloc[-1]),
        "fresh": float(mean.fresh.mean()),
        "before_h0": float(mean.before.iloc[0]),
        "before_last": float(mean.before.iloc[-1]),
        "aged_after": float(aged.idxmax()) if aged.any() else float("nan"),
    }


def synthetic_loads(
    layers: int, n_experts: int, skew: float, seed: int = 0, steps: int = 0, drift: float = 0.0, tokens: int = 0
) -> torch.Tensor:
    """Skewed expert loads: each layer's expert popularity is log-normal with σ = ``skew`` (0 = uniform).

    ``steps`` = 0: the expected loads [layers, E] (sum 1 per layer). ``steps`` > 0: per-step counts
    [steps, layers, E], the log-popularities taking a random walk (σ = ``drift`` per step) and each step's
    ``tokens`` (token, expert) pairs drawn multinomially from it (``tokens`` = 0: the expected loads themselves).
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, n_experts, generator=g, dtype=torch.float64) * skew
    if steps == 0:
        return logits.softmax(-1)
    out = []
    for _ in range(steps):
        p = logits.softmax(-1)  # [L, E]
        if tokens:
            p = torch.stack(
                [torch.bincount(torch.multinomial(row, tokens, True, generator=g), minlength=n_experts) for row in p]
            ).double()
        out.append(p)
        logits = logits + drift * torch.randn(layers, n_experts, generator=g, dtype=torch.float64)
    return torch.stack(out)
