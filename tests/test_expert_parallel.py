"""Expert parallelism (dsv3lab.parallel.expert): the EP MoE layer on real gloo processes equals the single-process
MoE — outputs, input gradients, every parameter gradient, the aux-loss-free bias update — with 2 ranks (and 4 ranks,
including DP 2 × EP 2); redundant experts change nothing but the per-GPU load; checkpoints load by global index into
any EP size. The dispatch plan is checked by hand and by a simulation of four ranks in one process.

Tolerance: fp32, ``assert_close(rtol=1e-5, atol=1e-6)`` — the sums of a token's expert outputs run in another order.
One spawn per process count runs every check of that count (starting processes dominates the time).
"""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dsv3lab import ModelConfig
from dsv3lab.balance import bias_delta, update_selection_bias
from dsv3lab.model import MoE
from dsv3lab.model.moe import Experts
from dsv3lab.parallel import spawn
from dsv3lab.parallel.eplb import rebalance_experts
from dsv3lab.parallel.expert import (
    ExpertParallelMoE,
    ExpertPlacement,
    _bank_config,
    ep_check,
    plan_dispatch,
    sync_gradients,
)

TOL = dict(rtol=1e-5, atol=1e-6)
BATCH, SEQ = 2, 12  # tokens per rank: [BATCH, SEQ]


# ---------------------------------------------------------------------- helpers run inside the ranks
def _reference(cfg, seed=0):
    torch.manual_seed(seed)
    moe = MoE(cfg)
    moe.init_weights(cfg.init_std)
    with torch.no_grad():
        moe.gate.bias.normal_(0, 0.1)  # a non-zero selection bias, so that it matters
    return moe


def _inputs(cfg, n_ranks, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_ranks * BATCH, SEQ, cfg.dim, generator=g)
    return x, torch.randn(x.shape, generator=g)  # inputs and the gradient of the output


def _arr(t):
    """A tensor -> a numpy array (results leave the rank by value)."""
    return t.detach().numpy().copy()


def _layer_case(cfg, placement=None, group=None, data_rank=None, n_data=None, expert_group=None, bias_group=None):
    """One EP layer on this rank's tokens against the single-process MoE on every rank's tokens."""
    rank, world = dist.get_rank(), dist.get_world_size()
    data_rank = rank if data_rank is None else data_rank
    n_data = world if n_data is None else n_data
    ref = _reference(cfg)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    x_all, dy_all = _inputs(cfg, n_data)
    mine = slice(data_rank * BATCH, (data_rank + 1) * BATCH)

    ref.train()
    xr = x_all.clone().requires_grad_()
    yr = ref(xr)
    (yr * dy_all).sum().backward()

    ep = ExpertParallelMoE(cfg, group, placement)
    ep.load_global_state_dict(state)
    ep.train()
    x = x_all[mine].clone().requires_grad_()
    y = ep(x)
    (y * dy_all[mine]).sum().backward()
    sync_gradients(ep, dense_group=None, expert_group=expert_group)  # replicated parameters: summed over all ranks

    ids = torch.tensor(ep.expert_ids)
    out = {
        "y": (y, yr[mine]),
        "dx": (x.grad, xr.grad[mine]),
        "gate.weight": (ep.gate.weight.grad, ref.gate.weight.grad),
        "shared.w1": (ep.shared_experts.w1.weight.grad, ref.shared_experts.w1.weight.grad),
        "shared.w2": (ep.shared_experts.w2.weight.grad, ref.shared_experts.w2.weight.grad),
    }
    for name in ("w1", "w2", "w3"):
        ref_grad = getattr(ref.experts, name).grad
        out[f"experts.{name}"] = (getattr(ep.experts, name).grad, ref_grad[ids])
    # the aux-loss-free update: counts all-reduced over the ranks that hold data (every rank by default)
    bias0 = ep.gate.bias.clone()
    ref_counts = ref.tokens_per_expert.clone()
    counts = update_selection_bias([ep], 1e-3, group=bias_group)[0]
    out["counts"] = (counts, ref_counts)
    out["bias"] = (ep.gate.bias, bias0 + bias_delta(ref_counts, 1e-3))
    return {k: (_arr(a), _arr(b)) for k, (a, b) in out.items()}


def _two_ranks(rank, world):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    res = {}
    for impl in ("loop", "grouped"):
        res[f"layer_{impl}"] = _layer_case(cfg.replace(moe_impl=impl))
    res["layer_fp8"] = _layer_case(cfg.replace(fp8=True))  # FP8 expert GEMMs (1x128 / 128x128 scales) under EP

    # a rank that receives no token: every token picks experts 0-3, all on rank 0
    ref = _reference(cfg)
    state = ref.state_dict()
    state["gate.bias"] = state["gate.bias"] + torch.tensor([5.0] * 4 + [0.0] * 4)
    ep = ExpertParallelMoE(cfg)
    ep.load_global_state_dict(state)
    ref.load_state_dict(state)
    x_all, dy_all = _inputs(cfg, world)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    x = x_all[mine].clone().requires_grad_()
    (ep(x) * dy_all[mine]).sum().backward()
    xr = x_all.clone().requires_grad_()
    (ref(xr) * dy_all).sum().backward()
    res["idle"] = {
        "dx": (_arr(x.grad), _arr(xr.grad[mine])),
        "recv": ep.experts.last_recv_counts,
        "w1": (
            np.zeros(0) if ep.experts.w1.grad is None else _arr(ep.experts.w1.grad),
            _arr(ref.experts.w1.grad[torch.tensor(ep.expert_ids)]),
        ),
    }

    # redundant experts (EPLB from this batch's loads): same output, loads per replica split evenly
    ref = _reference(cfg).eval()
    with torch.no_grad():
        ref(x_all)
    counts = ref.last_counts.clone()
    phy2log = rebalance_experts(counts[None].float(), 12, cfg.n_expert_groups, 1, world)[0][0]
    placement = ExpertPlacement(phy2log, world, cfg.n_routed_experts)
    rep = ExpertParallelMoE(cfg, placement=placement).eval()
    rep.load_global_state_dict(ref.state_dict())
    plain = ExpertParallelMoE(cfg).eval()
    plain.load_global_state_dict(ref.state_dict())
    with torch.no_grad():
        y_rep, y_plain = rep(x_all[mine]), plain(x_all[mine])
    load = rep.experts.last_slot_load.clone()
    loads = [torch.zeros_like(load) for _ in range(world)]
    dist.all_gather(loads, load)
    res["replicas"] = {
        "y": (_arr(y_rep), _arr(ref(x_all[mine])), _arr(y_plain)),
        "phy2log": _arr(phy2log),
        "slot_loads": _arr(torch.cat(loads)),
        "counts": _arr(counts),
        "plain_gpu_load": int(plain.experts.last_slot_load.sum()),
    }

    # the checkpoint back by global index (gathered from both ranks) equals the single-process one
    gathered = rep.global_state_dict()
    res["global_state"] = {k: (_arr(gathered[k]), _arr(v)) for k, v in ref.state_dict().items()}

    # the whole tiny model, MoE layers sharded (main + MTP), one training step
    res["model"] = ep_check("tiny", batch=2, seq_len=12, replicas=12)
    return res


@pytest.fixture(scope="module")
def two_ranks():
    return spawn(_two_ranks, 2, timeout=600)


# ---------------------------------------------------------------------- 2 processes
@pytest.mark.parametrize("impl", ["loop", "grouped", "fp8"])
def test_ep_layer_equals_single_process_moe(two_ranks, impl):
    for rank, res in enumerate(two_ranks):
        for name, (mine, ref) in res[f"layer_{impl}"].items():
            a, b = torch.from_numpy(mine), torch.from_numpy(ref)
            if name == "counts":
                assert torch.equal(a, b), f"rank {rank} {name}"
            elif impl == "fp8" and name not in ("y", "dx", "bias"):
                # FP8 Wgrad quantizes 128-token tiles of each rank's own (or received) tokens: a data-parallel sum of
                # per-rank FP8 weight gradients is not the FP8 gradient of the whole batch; close, not equal
                assert (a - b).norm() <= 0.05 * b.norm(), f"rank {rank} {name}: {(a - b).norm() / b.norm():.3f}"
            else:
                torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")


def test_bias_update_equals_single_process(two_ranks):
    for res in two_ranks:
        counts, ref_counts = res["layer_loop"]["counts"]
        assert counts.sum() == 2 * BATCH * SEQ * 2  # every token of both ranks, K = 2 choices each
        np.testing.assert_array_equal(counts, ref_counts)
        np.testing.assert_array_equal(*res["layer_loop"]["bias"])


def test_a_rank_without_tokens_still_joins_forward_and_backward(two_ranks):
    rank0, rank1 = two_ranks
    assert rank1["idle"]["recv"] == [0, 0] and sum(rank0["idle"]["recv"]) > 0
    for res in two_ranks:
        torch.testing.assert_close(*map(torch.from_numpy, res["idle"]["dx"]), **TOL)
    assert rank1["idle"]["w1"][0].size == 0 and not rank1["idle"]["w1"][1].any()  # no token, no gradient
    torch.testing.assert_close(*map(torch.from_numpy, rank0["idle"]["w1"]), **TOL)


def test_redundant_experts_change_the_load_not_the_output(two_ranks):
    for res in two_ranks:
        y_rep, y_ref, y_plain = map(torch.from_numpy, res["replicas"]["y"])
        torch.testing.assert_close(y_rep, y_ref, **TOL)
        torch.testing.assert_close(y_plain, y_ref, **TOL)
    rep = two_ranks[0]["replicas"]
    phy2log, slot_loads, counts = rep["phy2log"], rep["slot_loads"], rep["counts"]
    # each rank sent its copy of the batch; loads are over both ranks' token copies
    per_expert = np.bincount(phy2log, weights=slot_loads, minlength=len(counts))
    np.testing.assert_array_equal(per_expert, counts)  # the replicas together compute every pair once
    for e in np.flatnonzero(np.bincount(phy2log) > 1):
        shares = slot_loads[phy2log == e]
        assert shares.max() - shares.min() <= 2, (e, shares)  # round robin: ±1 per source rank
    gpu = slot_loads.reshape(2, -1).sum(1)
    plain = [r["replicas"]["plain_gpu_load"] for r in two_ranks]
    assert gpu.max() <= max(plain)  # EPLB never makes the busiest GPU busier on the loads it was planned on


def test_checkpoint_gathered_by_global_index(two_ranks):
    for res in two_ranks:
        for name, (mine, ref) in res["global_state"].items():
            np.testing.assert_array_equal(mine, ref, err_msg=name)


def test_whole_model_step_equals_single_process(two_ranks):
    for res in two_ranks:
        d = res["model"]["max_abs_diff"]
        assert d["logits"] <= 1e-5 and d["loss"] <= 1e-5 and d["grad"] <= 1e-6, d
        assert d["bias"] == 0 and d["counts"] == 0, d
        assert d["logits_replicated"] <= 1e-5, d
        assert sum(res["model"]["pairs"]) > 0


# ---------------------------------------------------------------------- one process: the plan by hand
def test_plan_dispatch_by_hand():
    # 3 tokens, K = 2, 4 slots on 2 ranks (2 each)
    slots = torch.tensor([[0, 3], [1, 0], [2, 3]])
    plan = plan_dispatch(slots, slots_per_rank=2, n_ranks=2)
    assert plan.send_counts.tolist() == [2, 2]  # tokens 0, 1 -> rank 0; tokens 0, 2 -> rank 1
    assert plan.token.tolist() == [0, 1, 0, 2]
    assert plan.local_slot.tolist() == [[0, -1], [1, 0], [-1, 1], [0, 1]]


def test_placement_splits_an_experts_tokens_over_its_replicas():
    placement = ExpertPlacement([0, 1, 0, 2, 0, 3], n_ranks=3)  # expert 0 has 3 replicas: slots 0, 2, 4
    assert placement.logcnt.tolist() == [3, 1, 1, 1]
    assert placement.log2phy[0].tolist() == [0, 2, 4] and placement.expert_ids(1) == [0, 2]
    indices = torch.tensor([[0, 1]] * 7 + [[2, 0]])
    # expert 0's eight pairs, in token order, go to its replicas in turn: slots 0, 2, 4, 0, 2, 4, 0, 2
    assert placement.assign(indices).tolist() == [[0, 1], [2, 1], [4, 1], [0, 1], [2, 1], [4, 1], [0, 1], [3, 2]]
    contiguous = ExpertPlacement.contiguous(8, 4)
    assert torch.equal(contiguous.assign(indices), indices)


def test_placement_refuses_bad_input():
    with pytest.raises(ValueError, match="divide"):
        ExpertPlacement([0, 1, 2], n_ranks=2)
    with pytest.raises(ValueError, match="experts \\[2\\]"):
        ExpertPlacement([0, 1, 3, 3], n_ranks=2, n_experts=4)
    with pytest.raises(ValueError, match="divisible by the EP size"):
        ExpertPlacement.contiguous(8, 3)
    with pytest.raises(ValueError, match="process group"):
        ExpertParallelMoE(ModelConfig.preset("tiny"))


def test_four_simulated_ranks_equal_the_moe():
    """The whole exchange in one process: four ranks as lists, all_to_all as a transpose of those lists."""
    cfg = ModelConfig.preset("tiny")
    moe = _reference(cfg).eval()
    n_ranks = 4
    placement = ExpertPlacement.contiguous(cfg.n_routed_experts, n_ranks)
    x_all, _ = _inputs(cfg, n_ranks)
    banks = []
    for r in range(n_ranks):
        bank = Experts(_bank_config(cfg, placement.slots_per_rank))
        for name in ("w1", "w2", "w3"):
            getattr(bank, name).data = getattr(moe.experts, name).data[placement.expert_ids(r)]
        banks.append(bank)
    with torch.no_grad():
        send, plans, xs = [], [], []
        for r in range(n_ranks):
            x = x_all[r * BATCH : (r + 1) * BATCH].flatten(0, 1)
            w, idx, _ = moe.gate(x)
            plan = plan_dispatch(placement.assign(idx), placement.slots_per_rank, n_ranks)
            rows = torch.cat([x, w], -1)[plan.token].split(plan.send_counts.tolist())
            slots = plan.local_slot.split(plan.send_counts.tolist())
            send.append(list(zip(rows, slots)))
            plans.append(plan)
            xs.append(x)
        back = [[None] * n_ranks for _ in range(n_ranks)]
        for dst in range(n_ranks):  # all_to_all: rank dst receives chunk dst of every rank
            for src in range(n_ranks):
                rows, slot = send[src][dst]
                row, k = (slot >= 0).nonzero(as_tuple=True)
                out = banks[dst](rows[row, : cfg.dim], rows[row, cfg.dim + k, None], slot[row, k, None])
                back[src][dst] = torch.zeros(rows.shape[0], cfg.dim).index_add(0, row, out)
        for r in range(n_ranks):
            y = torch.zeros_like(xs[r]).index_add(0, plans[r].token, torch.cat(back[r]))
            y = y + moe.shared_experts(xs[r])
            torch.testing.assert_close(y, moe(x_all[r * BATCH : (r + 1) * BATCH]).flatten(0, 1), **TOL)


# ---------------------------------------------------------------------- 4 processes: EP 4, and DP 2 × EP 2
def _four_ranks(rank, world):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    res = {"ep4": _layer_case(cfg)}
    # DP 2 × EP 2: EP groups {0, 1} and {2, 3}; the replicas of an EP rank, {0, 2} and {1, 3}, sum expert gradients
    ep_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    res["dp2_ep2"] = _layer_case(cfg, group=ep_groups[rank // 2], expert_group=dp_groups[rank % 2])
    # counts all-reduced over a group only (pipeline stages: the ranks holding the same layers)
    moe = MoE(cfg)
    moe.tokens_per_expert.fill_(rank + 1)
    res["bias_group"] = update_selection_bias([moe], 0.0, group=dp_groups[rank % 2])[0].tolist()
    return res


@pytest.fixture(scope="module")
def four_ranks():
    return spawn(_four_ranks, 4, timeout=600)


@pytest.mark.parametrize("layout", ["ep4", "dp2_ep2"])
def test_four_ranks_equal_single_process(four_ranks, layout):
    for rank, res in enumerate(four_ranks):
        for name, (mine, ref) in res[layout].items():
            torch.testing.assert_close(
                torch.from_numpy(mine), torch.from_numpy(ref), **TOL, msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}"
            )
    assert four_ranks[0][layout]["counts"][0].sum() == 4 * BATCH * SEQ * 2


def test_bias_counts_reduced_over_a_given_group(four_ranks):
    # groups {0, 2} and {1, 3}: rank r counted r + 1 tokens per expert
    assert [res["bias_group"][0] for res in four_ranks] == [1 + 3, 2 + 4, 1 + 3, 2 + 4]


def test_dsv3lab_ep_report(two_ranks, capsys):
    from dsv3lab.cli import main
    from dsv3lab.parallel.expert import format_ep_check

    text = format_ep_check([res["model"] for res in two_ranks])
    assert "tiny preset on 2 ranks" in text and "max |difference| vs one process: logits" in text
    assert "without replicas →" in text and "with EPLB's 12 slots" in text
    assert main(["ep", "--nproc", "0"]) == 2 and "--nproc must be >= 1" in capsys.readouterr().err
