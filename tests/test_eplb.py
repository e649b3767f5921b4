"""EPLB (dsv3lab.parallel.eplb): DeepSeek's README example reproduced, the plan's invariants on random loads for both
policies, the replication step optimal against brute force, loads per GPU by hand, and every bad input refused."""

import itertools

import pytest
import torch

from dsv3lab.parallel.eplb import (
    balanced_packing,
    contiguous_placement,
    gpu_loads,
    imbalance,
    rebalance_experts,
    replicate_experts,
)

README_WEIGHT = torch.tensor(
    [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
)


def test_readme_example():
    """github.com/deepseek-ai/EPLB README: 2 layers × 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs."""
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert phy2log.tolist() == [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
    assert log2phy.shape == (2, 12, 2) and logcnt.shape == (2, 12)
    _check_plan(README_WEIGHT, phy2log, log2phy, logcnt, 16, 4, 2, 8, hierarchical=True)
    # the balance the README does not print: max/mean load per GPU of each layer
    after = imbalance(gpu_loads(README_WEIGHT, phy2log, 8))
    assert after.tolist() == pytest.approx([1.2081, 1.2422], abs=1e-4)


def _check_plan(weight, phy2log, log2phy, logcnt, replicas, groups, nodes, gpus, hierarchical):
    layers, n_log = weight.shape
    assert phy2log.shape == (layers, replicas) and logcnt.shape == (layers, n_log)
    assert log2phy.shape == (layers, n_log, int(logcnt.max()))
    assert ((phy2log >= 0) & (phy2log < n_log)).all()
    assert (logcnt >= 1).all(), "every logical expert needs a replica"
    assert (logcnt.sum(-1) == replicas).all(), "replica counts add up to the slots"
    for layer in range(layers):
        assert torch.equal(torch.bincount(phy2log[layer], minlength=n_log), logcnt[layer])
        for e in range(n_log):
            slots = log2phy[layer, e]
            c = int(logcnt[layer, e])
            assert (slots[c:] == -1).all()
            assert sorted(slots[:c].tolist()) == (phy2log[layer] == e).nonzero().flatten().tolist()
    # each GPU holds replicas / gpus slots (slots are contiguous per GPU) and the GPU loads add up to the total
    loads = gpu_loads(weight, phy2log, gpus)
    torch.testing.assert_close(loads.sum(-1), weight.double().sum(-1))
    if hierarchical:  # a group never straddles two nodes, and every node gets groups / nodes groups
        node_of_slot = torch.arange(replicas) // (replicas // nodes)
        group_size = n_log // groups
        for layer in range(layers):
            node_of_group = {}
            for slot, e in enumerate(phy2log[layer].tolist()):
                node_of_group.setdefault(e // group_size, set()).add(int(node_of_slot[slot]))
            assert all(len(n) == 1 for n in node_of_group.values()), node_of_group
            per_node = torch.bincount(torch.tensor([next(iter(n)) for n in node_of_group.values()]), minlength=nodes)
            assert (per_node == groups // nodes).all()


CASES = [  # (experts, replicas, groups, nodes, gpus)
    (12, 16, 4, 2, 8),
    (16, 24, 4, 2, 4),
    (16, 16, 4, 4, 8),
    (32, 48, 8, 4, 16),
    (64, 72, 8, 2, 8),
    (16, 24, 4, 3, 6),  # 3 nodes do not divide 4 groups: the global policy
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_plan_invariants_on_random_loads(case, seed):
    n_log, replicas, groups, nodes, gpus = case
    g = torch.Generator().manual_seed(seed)
    weight = torch.randint(0, 500, (3, n_log), generator=g) * (torch.rand(3, n_log, generator=g) < 0.8)
    weight = weight * torch.logspace(0, 1.5, n_log)[torch.randperm(n_log, generator=g)]  # skewed
    plan = rebalance_experts(weight, replicas, groups, nodes, gpus)
    _check_plan(weight, *plan, replicas, groups, nodes, gpus, hierarchical=groups % nodes == 0)
    glob = rebalance_experts(weight, replicas, groups, nodes, gpus, policy="global")
    _check_plan(weight, *glob, replicas, groups, nodes, gpus, hierarchical=False)
    assert all(torch.equal(a, b) for a, b in zip(glob, rebalance_experts(weight, replicas, 1, 1, gpus)))
    if groups % nodes:  # auto = global here
        assert all(torch.equal(a, b) for a, b in zip(plan, glob))
    # the point of it all: EPLB's busiest GPU is no busier than the contiguous placement's, for each layer
    if n_log % gpus == 0:
        before = gpu_loads(weight, contiguous_placement(3, n_log), gpus).amax(-1)
        assert (gpu_loads(weight, glob[0], gpus).amax(-1) <= before + 1e-6).all()


def test_replicate_experts_is_optimal_against_brute_force():
    """Greedy replication minimises the largest load per replica: compare with every way to spread the spares."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        weight = torch.rand(1, 5, generator=g) * torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
        spares = 4
        _, _, logcnt = replicate_experts(weight, 5 + spares)
        greedy = float((weight / logcnt).max())
        best = min(
            float((weight / (1 + torch.tensor(extra))).max())
            for extra in itertools.product(range(spares + 1), repeat=5)
            if sum(extra) == spares
        )
        assert greedy == pytest.approx(best)


def test_balanced_packing_by_hand():
    # heaviest first onto the lightest pack with room: 9 -> A, 7 -> B, 5 -> B (12), 2 -> A (11), then full packs
    pack, pos = balanced_packing(torch.tensor([[2.0, 9.0, 5.0, 7.0]]), 2)
    assert pack.tolist() == [[0, 0, 1, 1]] and pos.tolist() == [[1, 0, 1, 0]]
    pack, pos = balanced_packing(torch.tensor([[3.0, 1.0, 2.0]]), 3)  # one item per pack: item i stays in pack i
    assert pack.tolist() == [[0, 1, 2]] and pos.tolist() == [[0, 0, 0]]


def test_gpu_loads_by_hand():
    weight = torch.tensor([[6.0, 2.0, 1.0, 1.0]])
    # expert 0 has 3 replicas carrying 6 / 3 = 2 each; 2 slots per GPU: [0, 1 | 0, 2 | 3, 0] -> 4, 3, 3
    phy2log = torch.tensor([[0, 1, 0, 2, 3, 0]])
    assert gpu_loads(weight, phy2log, 3).tolist() == [[4.0, 3.0, 3.0]]
    assert imbalance(gpu_loads(weight, phy2log, 3)).item() == pytest.approx(4 / (10 / 3))


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.ones(12), 16, 4, 2, 8), "layers, experts"),
        ((torch.ones(1, 12), 8, 4, 2, 8), "num_replicas .* >= "),
        ((torch.ones(1, 12), 18, 4, 2, 8), "multiple of num_gpus"),
        ((torch.ones(1, 12), 16, 4, 3, 8), "num_gpus .* multiple of num_nodes"),
        ((torch.ones(1, 12), 16, 5, 2, 8), "num_groups .* equal groups"),
        ((-torch.ones(1, 12), 16, 4, 2, 8), ">= 0"),
        ((torch.ones(1, 12), 16, 4, 0, 8), "num_nodes must be >= 1"),
    ],
)
def test_bad_input_is_refused(args, match):
    with pytest.raises(ValueError, match=match):
        rebalance_experts(*args)


def test_policy_is_checked():
    with pytest.raises(ValueError, match="policy must be one of"):
        rebalance_experts(README_WEIGHT, 16, 4, 2, 8, policy="best")
    with pytest.raises(ValueError, match="hierarchical policy needs"):
        rebalance_experts(torch.ones(1, 12), 24, 4, 3, 6, policy="hierarchical")


def test_figures_and_widget():
    import matplotlib
    import matplotlib.pyplot

    matplotlib.use("Agg")
    import pandas as pd
    from matplotlib.figure import Figure

    from dsv3lab.parallel.eplb import balance_report, rebalance_drift, synthetic_loads
    from dsv3lab.viz.expert_parallel import plot_balance, plot_drift, plot_gpu_loads, plot_placement
    from dsv3lab.viz.widgets import eplb_explorer

    phy2log = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)[0]
    fig = plot_placement(README_WEIGHT[0], phy2log[0], 8, 2)
    assert isinstance(fig, Figure) and "max/mean = 1.208" in fig.axes[0].get_title()
    fig = plot_gpu_loads(README_WEIGHT[0], {"hierarchical": phy2log[0]}, 8)
    assert "max/mean 1.208" in fig.axes[0].get_legend().get_texts()[0].get_text()
    r = balance_report(README_WEIGHT.float(), 16, 4, 2, 8)
    table = pd.DataFrame([{"config": "readme", "before": r["before"], "hierarchical": r["after"]}])
    assert isinstance(plot_balance(table), Figure)
    counts = synthetic_loads(2, 16, 1.0, seed=0, steps=12, drift=0.1, tokens=512)
    assert counts.shape == (12, 2, 16) and (counts.sum(-1) == 512).all()
    drift = rebalance_drift(counts, 24, 4, 2, 8, window=3, horizon=4, stride=4)
    assert set(drift.h) == {0, 1, 2, 3} and (drift.fresh <= drift.after + 1e-9).mean() > 0.9
    assert isinstance(plot_drift(drift), Figure)
    box = eplb_explorer(README_WEIGHT, num_groups=4)
    assert "12 experts" in box.children[2].value
    box.children[0].children[0].value = 3  # 3 nodes do not divide 4 groups: auto falls back to the global policy
    assert "3 nodes" in box.children[2].value
    matplotlib.pyplot.close("all")


def test_balance_report_and_drift_by_hand():
    from dsv3lab.parallel.eplb import balance_report, rebalance_drift

    weight = torch.tensor([[8.0, 1.0, 1.0, 2.0]])  # contiguous on 2 GPUs: 9 vs 3 -> max/mean 1.5
    assert balance_report(weight, 4, 1, 1, 2)["before"] == pytest.approx(1.5)
    # 6 slots: expert 0 gets 3 replicas of 8/3; GPUs of 3 slots: {8/3, 8/3, 1} and {8/3, 2, 1} -> 19/3 vs 17/3
    assert balance_report(weight, 6, 1, 1, 2)["after"] == pytest.approx((19 / 3) / 6)
    flipped = weight.flip(-1)
    counts = torch.cat([weight, weight, flipped])[:, None]  # [3 steps, 1 layer, 4]: the load flips at step 2
    d = rebalance_drift(counts, 6, 1, 1, 2, window=2, horizon=1, stride=1)
    assert len(d) == 1 and d.start[0] == 2
    assert d.after[0] == pytest.approx(balance_report(weight, 6, 1, 1, 2, eval_weight=flipped)["after"])
    assert d.fresh[0] == pytest.approx(balance_report(flipped, 6, 1, 1, 2)["after"])
    assert d.before[0] == pytest.approx(1.5) and d.after[0] > d.fresh[0]
