import pytest
import torch

from dsv3lab import ModelConfig
from dsv3lab.balance import balance_loss
from dsv3lab.model import Gate, MoE


def _moe(cfg, impl, seed=0):
    torch.manual_seed(seed)
    moe = MoE(cfg.replace(moe_impl=impl))
    moe.init_weights(0.1)
    return moe


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loop_equals_grouped_outputs_and_gradients(tiny_cfg, dtype):
    loop = _moe(tiny_cfg, "loop")
    grouped = _moe(tiny_cfg, "grouped")
    grouped.load_state_dict(loop.state_dict())
    loop.to(dtype)
    grouped.to(dtype)
    x = torch.randn(3, 17, tiny_cfg.dim, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = loop(x1), grouped(x2)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y1, y2, **tol)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    for (name, p1), p2 in zip(loop.named_parameters(), grouped.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, **tol, msg=name)
    # plain .sum() hands grouped_mm an expanded gradient: it must still work
    grouped(x.clone()).sum().backward()


def test_gate_matches_a_hand_computation():
    cfg = ModelConfig.preset("tiny", n_expert_groups=1, n_limited_groups=1)
    gate = Gate(cfg)
    gate.init_weights(0.3)
    x = torch.randn(5, cfg.dim)
    weights, idx, scores = gate(x)
    s = torch.sigmoid(x @ gate.weight.T)
    torch.testing.assert_close(scores, s)
    top = (s + gate.bias).topk(cfg.n_activated_experts, dim=-1).indices
    assert torch.equal(idx.sort(-1).values, top.sort(-1).values)
    w = s.gather(1, idx)
    torch.testing.assert_close(weights, w / w.sum(-1, keepdim=True) * cfg.route_scale)
    torch.testing.assert_close(weights.sum(-1), torch.full((5,), cfg.route_scale))


def test_group_limited_routing_never_selects_outside_the_kept_groups():
    cfg = ModelConfig.preset("toy")  # 16 experts in 4 groups, keep 2, top-4
    gate = Gate(cfg)
    gate.init_weights(0.5)
    gate.bias.normal_(0, 0.2)
    x = torch.randn(512, cfg.dim)
    _, idx, scores = gate(x)
    choice = (scores + gate.bias).view(512, cfg.n_expert_groups, -1)
    group_score = choice.topk(2, dim=-1).values.sum(-1)  # hand computation of the top-2-sum group score
    kept = group_score.topk(cfg.n_limited_groups, dim=-1).indices
    chosen_groups = idx // cfg.experts_per_group
    for t in range(512):
        assert set(chosen_groups[t].tolist()) <= set(kept[t].tolist())
    # and the constraint binds: without it some tokens would pick from a third group
    free = (scores + gate.bias).topk(cfg.n_activated_experts, dim=-1).indices // cfg.experts_per_group
    assert any(len(set(free[t].tolist())) > cfg.n_limited_groups for t in range(512))


def test_bias_changes_selection_not_gate_weights_and_gets_no_gradient(tiny_cfg):
    cfg = tiny_cfg.replace(n_expert_groups=1, n_limited_groups=1)
    gate = Gate(cfg)
    gate.init_weights(0.3)
    x = torch.randn(64, cfg.dim)
    w0, idx0, s0 = gate(x)
    with torch.no_grad():
        gate.bias[idx0.flatten().mode().values] = 10.0  # make one expert irresistible
    w1, idx1, s1 = gate(x)
    assert not torch.equal(idx0, idx1)
    torch.testing.assert_close(s0, s1)  # the affinities do not see the bias
    w_expected = s1.gather(1, idx1)
    torch.testing.assert_close(w1, w_expected / w_expected.sum(-1, keepdim=True) * cfg.route_scale)
    assert "bias" not in dict(gate.named_parameters()) and "bias" in dict(gate.named_buffers())
    w1.sum().backward()
    assert gate.bias.grad is None and not gate.bias.requires_grad
    assert gate.weight.grad is not None


def test_bias_stays_fp32_when_the_model_is_cast(tiny_cfg):
    gate = Gate(tiny_cfg)
    gate.init_weights(0.1)
    gate.bias.fill_(1e-3 + 1e-7)
    gate.to(torch.bfloat16)
    assert gate.weight.dtype == torch.bfloat16 and gate.bias.dtype == torch.float32
    assert gate.bias[0].item() == pytest.approx(1e-3 + 1e-7, rel=1e-6)


def test_softmax_gate_without_bias_uses_max_group_score():
    cfg = ModelConfig.preset("236B")
    assert cfg.score_func == "softmax" and not cfg.gate_bias
    small = cfg.replace(dim=16, n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=3)
    gate = Gate(small)
    gate.init_weights(1.0)
    x = torch.randn(200, 16)
    w, idx, s = gate(x)
    torch.testing.assert_close(s.sum(-1), torch.ones(200))
    kept = s.view(200, 4, 4).amax(-1).topk(2, dim=-1).indices
    for t in range(200):
        assert set((idx[t] // 4).tolist()) <= set(kept[t].tolist())
    torch.testing.assert_close(w, s.gather(1, idx) * small.route_scale)  # softmax weights are not renormalised


def test_counts_accumulate_only_in_training(tiny_cfg):
    moe = _moe(tiny_cfg, "loop")
    x = torch.randn(2, 10, tiny_cfg.dim)
    moe.eval()
    moe(x)
    assert moe.tokens_per_expert.sum() == 0 and moe.last_counts.sum() == 20 * tiny_cfg.n_activated_experts
    moe.train()
    moe(x)
    moe(x)
    assert moe.tokens_per_expert.sum() == 2 * 20 * tiny_cfg.n_activated_experts
    torch.testing.assert_close(moe.tokens_per_expert, 2 * moe.last_counts)


def test_balance_loss_hand_computation():
    # 1 sequence, 2 tokens, 4 experts, top-2
    scores = torch.tensor([[[0.9, 0.8, 0.1, 0.2], [0.7, 0.1, 0.6, 0.6]]])
    idx = torch.tensor([[[0, 1], [0, 2]]])
    p = scores / scores.sum(-1, keepdim=True)
    P = p.mean(1)[0]
    f = torch.tensor([2.0, 1.0, 1.0, 0.0]) * 4 / (2 * 2)
    assert balance_loss(scores, idx, per_sequence=True).item() == pytest.approx((f * P).sum().item(), rel=1e-6)
    # sequence-wise averages per-sequence losses; batch-wise pools the tokens
    two = torch.cat([scores, scores.flip(-1)])
    idx2 = torch.cat([idx, 3 - idx])
    seq = balance_loss(two, idx2, per_sequence=True)
    batch = balance_loss(two, idx2, per_sequence=False)
    assert seq.item() == pytest.approx((f * P).sum().item(), rel=1e-6)
    assert batch.item() < seq.item()  # pooled over both sequences, the load is more balanced


def test_no_token_is_dropped(tiny_cfg):
    moe = _moe(tiny_cfg, "grouped")
    with torch.no_grad():
        moe.gate.bias[0] = 100.0  # every token picks expert 0
    moe(torch.randn(4, 32, tiny_cfg.dim))
    assert moe.last_counts[0] == 128 and moe.last_counts.sum() == 128 * tiny_cfg.n_activated_experts
