import pytest
import torch
import torch.nn.functional as F

import dsv3lab
from dsv3lab.model import IGNORE_INDEX


def test_mtp_targets_are_shifted_correctly_hand_built(tiny_cfg):
    """Depth k at position i sees h^{k-1}_i and Emb(t_{i+k}) and predicts t_{i+k+1}; build it by hand."""
    cfg = tiny_cfg.replace(n_mtp=2)
    model = dsv3lab.build_model(cfg, seed=0)
    seq = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11]])  # t_0 .. t_7
    tokens, targets = seq[:, :-1], seq[:, 1:]  # targets[i] = t_{i+1}
    _, losses = model(tokens, targets)
    with torch.no_grad():
        h0 = model.hidden(tokens)  # [1, 7, d]
        cos, sin = model.rope(0, 6)
        m1 = model.mtp[0]
        h1 = m1.block(m1.eh_proj(torch.cat([m1.enorm(model.embed(seq[:, 1:7])), m1.hnorm(h0[:, :6])], -1)), 0, cos, sin)
        loss1 = F.cross_entropy(model.head(m1.norm(h1))[0], seq[0, 2:8])  # depth 1 predicts t_{i+2}
        cos, sin = model.rope(0, 5)
        m2 = model.mtp[1]
        h2 = m2.block(m2.eh_proj(torch.cat([m2.enorm(model.embed(seq[:, 2:7])), m2.hnorm(h1[:, :5])], -1)), 0, cos, sin)
        loss2 = F.cross_entropy(model.head(m2.norm(h2))[0], seq[0, 3:8])  # depth 2 predicts t_{i+3}
    assert losses["mtp_1"].item() == pytest.approx(loss1.item(), rel=1e-5)
    assert losses["mtp_2"].item() == pytest.approx(loss2.item(), rel=1e-5)
    total = losses["main"] + cfg.mtp_lambda / 2 * (loss1 + loss2)
    assert losses["total"].item() == pytest.approx(total.item(), rel=1e-5)
    _, l2 = model(tokens, targets, mtp_lambda=0.1)
    assert l2["total"].item() == pytest.approx((losses["main"] + 0.05 * (loss1 + loss2)).item(), rel=1e-5)


def test_mtp_is_dropped_at_inference_and_shares_embedding_and_head(tiny_model):
    tokens = torch.randint(0, tiny_model.cfg.vocab_size, (1, 12))
    no_mtp = dsv3lab.build_model(tiny_model.cfg.replace(n_mtp=0))
    state = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("mtp.")}
    no_mtp.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(tokens)[0], no_mtp(tokens)[0])
    assert not any("embed" in n or "head" in n for n, _ in tiny_model.mtp.named_parameters())


def test_ignored_targets_are_left_out(tiny_model):
    tokens = torch.randint(0, tiny_model.cfg.vocab_size, (1, 10))
    targets = tokens.roll(-1, 1)
    targets[:, -1] = IGNORE_INDEX
    _, losses = tiny_model(tokens, targets)
    logits, _ = tiny_model(tokens)
    ref = F.cross_entropy(logits[0, :-1], targets[0, :-1])
    assert losses["main"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.isfinite(losses["mtp_1"])
