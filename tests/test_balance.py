"""Load balancing: the auxiliary-loss-free bias update, the balance losses and the load statistics."""

import pytest
import torch

import dsv3lab
from dsv3lab.balance import (
    balance_loss,
    bias_delta,
    max_violation,
    max_violation_per_sequence,
    relative_load,
    sequence_counts,
    simulate_bias_update,
    update_selection_bias,
)
from dsv3lab.model.moe import MoE

pytestmark = pytest.mark.usefixtures("one_thread")


def skewed_moe(seed=0):
    """A tiny MoE whose router sends most tokens to experts 0 and 1 (their centroids align with the inputs)."""
    cfg = dsv3lab.ModelConfig.preset("tiny", n_expert_groups=1, n_limited_groups=1)
    torch.manual_seed(seed)
    moe = MoE(cfg)
    moe.init_weights(cfg.init_std)
    with torch.no_grad():
        moe.gate.weight[:2] += 0.05  # inputs have a positive mean: experts 0 and 1 score highest for most tokens
    return cfg, moe


def inputs(cfg, seed, n=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, cfg.dim, generator=g) * 0.5 + 1.0


def test_bias_delta_rules():
    counts = torch.tensor([10, 2, 4, 4])  # mean 5: expert 0 over, 1-3 under
    assert torch.equal(bias_delta(counts, 0.1), torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    centered = bias_delta(counts, 0.1, "sign_centered")
    assert torch.allclose(centered, torch.tensor([-0.15, 0.05, 0.05, 0.05]))
    assert abs(float(centered.sum())) < 1e-7
    assert torch.equal(bias_delta(torch.tensor([3, 3, 3]), 0.1), torch.zeros(3))  # balanced: no move
    with pytest.raises(ValueError, match="sign, sign_centered|one of"):
        bias_delta(counts, 0.1, "adaptive")


def test_bias_moves_toward_balance_on_a_skewed_router():
    cfg, moe = skewed_moe()
    moe.train()
    vio = []
    for step in range(150):
        moe(inputs(cfg, step))
        counts = update_selection_bias([moe], gamma=2e-3)[0]  # one optimizer step's counts
        vio.append(float(max_violation(counts)))
    first, final = vio[0], sum(vio[-10:]) / 10
    assert first > 1.5, "the constructed router should start skewed"
    assert final < 0.5 * first, (first, final)
    assert moe.gate.bias[:2].max() < 0 < moe.gate.bias[2:].min()  # overloaded experts pushed down, others up


def test_bias_is_untouched_by_autograd_and_by_eval_mode():
    cfg, moe = skewed_moe()
    assert "gate.bias" not in dict(moe.named_parameters()) and not moe.gate.bias.requires_grad
    with torch.no_grad():
        moe.gate.bias.normal_(0, 0.01)
    before = moe.gate.bias.clone()
    moe.train()
    opt = torch.optim.AdamW(moe.parameters(), lr=1e-2)
    moe(inputs(cfg, 0)).square().sum().backward()
    opt.step()
    assert moe.gate.bias.grad is None and torch.equal(moe.gate.bias, before)
    moe.tokens_per_expert.zero_()
    moe.eval()
    for seed in range(3):
        moe(inputs(cfg, seed))
    assert int(moe.tokens_per_expert.sum()) == 0  # eval forwards are not counted
    counts = update_selection_bias([moe], gamma=0.1)
    assert int(counts.sum()) == 0 and torch.equal(moe.gate.bias, before)  # ... so they cannot move the bias


def test_update_reads_and_resets_counts():
    cfg, moe = skewed_moe()
    moe.train()
    moe(inputs(cfg, 0, n=10))
    moe(inputs(cfg, 1, n=6))
    counts = update_selection_bias([moe], gamma=0.0)
    assert int(counts.sum()) == 16 * cfg.n_activated_experts
    assert int(moe.tokens_per_expert.sum()) == 0


def test_update_with_torch_distributed(tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        cfg, moe = skewed_moe()
        moe.train()
        moe(inputs(cfg, 0))
        expected = moe.tokens_per_expert.clone()
        counts = update_selection_bias([moe], gamma=1e-3)
        assert torch.equal(counts[0], expected)  # one rank: the all-reduce sum is the local count
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rule", ["sign", "sign_centered"])
def test_simulated_bias_update_equals_the_moe_layers(rule):
    """simulate_bias_update on the gate's affinities follows MoE.forward + update_selection_bias step for step."""
    cfg, moe = skewed_moe()
    moe.train()
    xs = [inputs(cfg, step) for step in range(40)]
    scores = torch.stack([torch.sigmoid(x[0] @ moe.gate.weight.T) for x in xs])  # [steps, T, E]
    counts, bias = simulate_bias_update(scores, cfg.n_activated_experts, 1e-2, rule)
    for step, x in enumerate(xs):
        moe(x)
        assert torch.equal(update_selection_bias([moe], 1e-2, rule)[0], counts[step]), step
        torch.testing.assert_close(moe.gate.bias, bias[step])
    assert max_violation(counts[-5:]).mean() < max_violation(counts[:1]).mean()  # the skew is being corrected


def test_simulated_bias_update_by_hand_and_bad_input():
    scores = torch.tensor([[[0.9, 0.5, 0.1]], [[0.9, 0.5, 0.1]], [[0.9, 0.5, 0.1]]])  # 3 steps of one token, top-1
    counts, bias = simulate_bias_update(scores, 1, 0.3)
    # step 0: expert 0 chosen (mean load 1/3) -> b = [-0.3, 0.3, 0.3]; step 1: 0.6 vs 0.8 vs 0.4 -> expert 1 ...
    assert counts.tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 0]]
    torch.testing.assert_close(bias, torch.tensor([[-0.3, 0.3, 0.3], [0.0, 0.0, 0.6], [-0.3, 0.3, 0.9]]))
    _, centered = simulate_bias_update(scores, 1, 0.3, "sign_centered")
    torch.testing.assert_close(centered.sum(-1), torch.zeros(3), atol=1e-6, rtol=0)  # Σ b stays 0
    torch.testing.assert_close(centered - centered.mean(-1, keepdim=True), bias - bias.mean(-1, keepdim=True))
    _, frozen = simulate_bias_update(scores, 1, 0.0)
    assert torch.equal(frozen, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="scores must be"):
        simulate_bias_update(scores[0], 1, 0.1)
    with pytest.raises(ValueError, match="k must be"):
        simulate_bias_update(scores, 4, 0.1)
    with pytest.raises(ValueError, match="gamma"):
        simulate_bias_update(scores, 1, -0.1)
    with pytest.raises(ValueError, match="rule"):
        simulate_bias_update(scores, 1, 0.1, "adaptive")


def test_sequence_wise_loss_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    b, s, e, k = 3, 5, 6, 2
    scores = torch.rand(b, s, e, generator=g)
    indices = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(b * s)]).view(b, s, k)
    per_seq = []
    for j in range(b):
        total = 0.0
        for i in range(e):
            f = e / (k * s) * sum(int(i in indices[j, t].tolist()) for t in range(s))
            p = sum(float(scores[j, t, i] / scores[j, t].sum()) for t in range(s)) / s
            total += f * p
        per_seq.append(total)
    assert balance_loss(scores, indices, per_sequence=True).item() == pytest.approx(sum(per_seq) / b, rel=1e-6)
    # the batch-wise (expert-level) loss treats all b*s tokens as one sequence
    flat = balance_loss(scores.reshape(1, b * s, e), indices.reshape(1, b * s, k), per_sequence=True)
    assert balance_loss(scores, indices, per_sequence=False).item() == pytest.approx(flat.item(), rel=1e-6)


def test_load_statistics():
    counts = torch.tensor([[4, 4, 4, 4], [8, 4, 2, 2]])
    assert torch.allclose(max_violation(counts), torch.tensor([0.0, 1.0], dtype=torch.float64))
    rel = relative_load(counts, k=2)
    assert torch.allclose(rel[1], torch.tensor([2.0, 1.0, 0.5, 0.5], dtype=torch.float64))
    idx = torch.tensor([[[0, 1], [0, 2]], [[3, 2], [1, 0]]])  # [b=2, s=2, K=2]
    assert torch.equal(sequence_counts(idx, 4), torch.tensor([[2, 1, 1, 0], [1, 1, 1, 1]]))
    # sequence 0: max 2 / mean 1 - 1 = 1; sequence 1: balanced
    assert float(max_violation_per_sequence(idx, 4)) == pytest.approx(0.5)
