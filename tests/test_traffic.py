"""Node-limited routing and its traffic (dsv3lab.parallel.traffic): copies and bytes of one token by hand, the
invariant "no token reaches more than M nodes" on the library's router at several shapes (and violated without the
limit, so the check has teeth), the paper's 3.2 / 13 arithmetic, and bad topologies refused."""

import pytest
import torch

from dsv3lab import ModelConfig, build_model
from dsv3lab.parallel.traffic import (
    Topology,
    combine_bytes,
    dispatch_bytes,
    gpus_per_token,
    model_routing,
    nodes_per_token,
    same_ib_cost,
    synthetic_routing,
    token_traffic,
    traffic_summary,
)


def test_one_token_by_hand():
    # 16 experts on 2 nodes × 2 GPUs (4 experts per GPU); the token starts on GPU 0 (node 0, in-node index 0)
    topo = Topology(n_experts=16, n_nodes=2, gpus_per_node=2)
    indices = torch.tensor([[0, 5, 9, 13], [0, 1, 2, 3]])  # token 0: GPUs 0, 1, 2, 3; token 1: all on GPU 0
    t = token_traffic(indices, topo, dim=256, source_gpu=torch.tensor([0, 0]))
    assert t.nodes.tolist() == [2, 1] and t.gpus.tolist() == [4, 1]
    # token 0: one IB copy to node 1, landing on GPU 2 (same in-node index 0), which is a target itself;
    # NVLink: GPU 0 -> GPU 1 on its own node, GPU 2 -> GPU 3 on node 1
    assert t.ib_copies.tolist() == [1, 0] and t.nvlink_copies.tolist() == [2, 0]
    assert dispatch_bytes(256) == 256 + 2 * 4 and combine_bytes(256) == 512  # FP8 + a scale per 128; BF16
    assert t.dispatch_ib_bytes.tolist() == [264, 0] and t.combine_nvlink_bytes.tolist() == [1024, 0]
    # from GPU 3 (node 1, index 1): node 0 is remote and its landing GPU (index 1 = GPU 1) is a target
    t = token_traffic(indices[:1], topo, dim=256, source_gpu=torch.tensor([3]))
    assert t.ib_copies.tolist() == [1] and t.nvlink_copies.tolist() == [2]  # GPU 1 -> GPU 0, GPU 3 -> GPU 2
    assert nodes_per_token(indices, topo).tolist() == [2, 1] and gpus_per_token(indices, topo).tolist() == [4, 1]


def test_summary_times():
    topo = Topology(16, 2, 2)
    t = token_traffic(torch.tensor([[0, 5, 9, 13]]), topo, dim=256, source_gpu=torch.tensor([0]))
    s = traffic_summary(t, topo, k=4)
    assert s["experts_per_node"] == 2.0
    assert s["t_ib_us"] == pytest.approx(264 / 50e3) and s["t_nvlink_us"] == pytest.approx(2 * 264 / 160e3)


SHAPES = [
    ModelConfig.preset("tiny"),  # 8 experts, 4 groups, M = 2, K = 2
    ModelConfig.preset("toy"),  # 16 experts, 4 groups, M = 2, K = 4
    ModelConfig.preset("671B", dim=256),  # 256 experts, 8 groups, M = 4, K = 8 (a narrow router: faster)
]


@pytest.mark.parametrize("cfg", SHAPES, ids=["tiny", "toy", "671B-routing"])
def test_no_token_reaches_more_than_m_nodes(cfg):
    topo = Topology.for_config(cfg, gpus_per_node=2)
    m = cfg.n_limited_groups
    for seed in range(3):
        limited = synthetic_routing(cfg, 512, seed=seed)
        assert nodes_per_token(limited, topo).max() <= m
        if cfg.n_activated_experts > m:  # (with K = M = 2 no routing can reach more than M nodes)
            free = synthetic_routing(cfg, 512, n_limited_groups=cfg.n_expert_groups, seed=seed)
            assert nodes_per_token(free, topo).max() > m  # without the limit tokens do spread further


def test_trained_style_routing_of_a_model_respects_the_limit():
    cfg = ModelConfig.preset("tiny")
    model = build_model(cfg, seed=0)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(2))
    own = model_routing(model, tokens)
    model(tokens)
    torch.testing.assert_close(own[0], model.moe_layers()[0].last_indices.flatten(0, 1))  # the model's own choices
    topo = Topology.for_config(cfg, gpus_per_node=1)
    assert nodes_per_token(own[0], topo).max() <= cfg.n_limited_groups
    free = model_routing(model, tokens, n_limited_groups=cfg.n_expert_groups)
    assert (nodes_per_token(free[0], topo) >= nodes_per_token(own[0], topo)).float().mean() > 0.5


def test_the_papers_arithmetic():
    s = same_ib_cost(Topology(256, 8, 8), max_nodes=4)
    assert s["experts_per_node"] == pytest.approx(3.2) and s["max_experts"] == pytest.approx(12.8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_experts=256, n_nodes=8, gpus_per_node=6), "split evenly"),
        (dict(n_experts=256, n_nodes=0, gpus_per_node=8), "n_nodes must be >= 1"),
        (dict(n_experts=256, n_nodes=8, gpus_per_node=8, ib_gbps=0), "must be > 0"),
    ],
)
def test_bad_topology_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Topology(**kwargs)


def test_token_drawing_counts_the_same_copies():
    import matplotlib
    import matplotlib.pyplot

    matplotlib.use("Agg")
    from dsv3lab.viz.expert_parallel import plot_nodes_per_token, plot_token_traffic

    topo = Topology(16, 2, 2)
    fig = plot_token_traffic([0, 5, 9, 13], topo, source_gpu=0)
    assert "2 nodes, 4 GPUs — 1 IB copies (red), 2 NVLink copies" in fig.axes[0].get_title()
    import pandas as pd

    table = pd.DataFrame({"routing": ["a", "a", "b"], "nodes": [1, 2, 2], "fraction": [0.5, 0.5, 1.0]})
    assert len(plot_nodes_per_token(table, limit=2).axes[0].patches) == 3
    matplotlib.pyplot.close("all")
