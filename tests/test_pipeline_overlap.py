"""overlapped_forward_backward for a DeepSeek-V3 block equals forward-then-backward; the backward split into input
and weight gradients equals the full backward; the MoE bookkeeping is kept as MoE.forward keeps it."""

import copy

import pytest
import torch

import dsv3lab
from dsv3lab.parallel.overlap import (
    backward_chunk,
    backward_weight,
    forward_chunk,
    overlapped_forward_backward,
    supports_parts,
)
from dsv3lab.parallel.stages import attach_aux


@pytest.fixture
def model(one_thread):
    cfg = dsv3lab.ModelConfig.preset("tiny", n_layers=3, seq_aux_loss_alpha=0.01)
    m = dsv3lab.build_model(cfg, seed=0)
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.bias.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return m.train()


def _x(model, seed, b=2, s=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, model.cfg.dim, generator=g)


def _reference(block, x, grad, cos, sin):
    """Block.forward then autograd: output, input gradient, parameter gradients (aux loss included)."""
    x = x.clone().requires_grad_()
    y = block(x, 0, cos, sin)
    aux = block.ffn.last_aux_loss
    loss = (y * grad).sum() + (aux if aux is not None else 0)
    params = [p for p in block.parameters() if p.requires_grad]
    gx, *gp = torch.autograd.grad(loss, [x] + params)
    return y.detach(), gx, dict(zip([id(p) for p in params], gp))


def _grads(block):
    return {id(p): p.grad.clone() for p in block.parameters() if p.grad is not None}


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_dense_blocks_stay_whole_and_moe_blocks_split(model):
    assert not supports_parts(model.layers[0]) and supports_parts(model.layers[1])


def test_forward_chunk_equals_block_forward_with_its_bookkeeping(model):
    block, (cos, sin) = model.layers[1], model.rope(0, 12)
    x = _x(model, 0)
    moe = block.ffn
    moe.tokens_per_expert.zero_()
    y_ref = block(x, 0, cos, sin)
    counts_ref, idx_ref, aux_ref = moe.tokens_per_expert.clone(), moe.last_indices.clone(), moe.last_aux_loss
    moe.tokens_per_expert.zero_()
    y, chunk = forward_chunk(block, x, cos, sin, attach_aux)
    _close(y, y_ref)
    assert torch.equal(moe.tokens_per_expert, counts_ref) and torch.equal(moe.last_indices, idx_ref)
    assert chunk.aux == pytest.approx(float(aux_ref.detach())) and chunk.aux > 0
    assert [p.name for p in chunk.parts] == ["attention", "dispatch", "mlp", "combine"]


def test_backward_by_pieces_and_the_input_weight_split_equal_autograd(model):
    block, (cos, sin) = model.layers[1], model.rope(0, 12)
    x, g = _x(model, 0), _x(model, 1)
    y_ref, gx_ref, gp_ref = _reference(block, x, g, cos, sin)
    for split in (False, True):
        block.zero_grad(set_to_none=True)
        y, chunk = forward_chunk(block, x, cos, sin, attach_aux)
        gx = backward_chunk(chunk, g, weights=not split)
        if split:  # B: input gradient only; no weight has a gradient yet
            assert _grads(block) == {}
            backward_weight(chunk)  # W
        _close(gx, gx_ref)
        got = _grads(block)
        assert set(got) == set(gp_ref)
        for k in gp_ref:
            _close(got[k], gp_ref[k])


@pytest.mark.parametrize("same_block", [True, False])
def test_overlapped_forward_backward_equals_forward_then_backward(model, same_block):
    """F of micro-batch A on block_f interleaved with the backward of micro-batch B on block_b (the F&B pair of
    DualPipe, where the two are often different stages)."""
    block_f = model.layers[1]
    block_b = model.layers[1] if same_block else model.layers[2]
    cos, sin = model.rope(0, 12)
    x_a, x_b, g_b = _x(model, 0), _x(model, 2), _x(model, 3)

    # forward-then-backward on a copy of the model: A's output, B's input and weight gradients
    ref = copy.deepcopy(model)
    rf, rb = ref.layers[1], ref.layers[1] if same_block else ref.layers[2]
    y_a_ref = rf(x_a, 0, cos, sin).detach()
    counts_ref = rf.ffn.tokens_per_expert.clone()
    _, gx_b_ref, gp_ref = _reference(rb, x_b, g_b, cos, sin)
    names = {id(p): n for n, p in rb.named_parameters()}
    gp_ref = {names[k]: v for k, v in gp_ref.items()}

    _, chunk_b = forward_chunk(block_b, x_b, cos, sin, attach_aux)
    block_f.zero_grad(set_to_none=True)
    block_b.zero_grad(set_to_none=True)
    block_f.ffn.tokens_per_expert.zero_()
    y_a, chunk_a, gx_b = overlapped_forward_backward(block_f, x_a, cos, sin, chunk_b, g_b, attach_aux)
    _close(y_a, y_a_ref)
    _close(gx_b, gx_b_ref)
    got = {n: p.grad for n, p in block_b.named_parameters() if p.grad is not None}
    assert set(got) == set(gp_ref)
    for n in gp_ref:
        _close(got[n], gp_ref[n])
    assert torch.equal(block_f.ffn.tokens_per_expert, counts_ref)  # A's routing counted once, as Block.forward does
    # and the forward chunk A left behind backpropagates like any other
    gx_a = backward_chunk(chunk_a, g_b)
    assert gx_a.shape == x_a.shape and torch.isfinite(gx_a).all()


def test_overlapped_pair_without_aux_attachment_drops_only_the_aux_gradient(model):
    """With no attach function the balance loss does not reach the gradient: the difference is the aux term alone."""
    block, (cos, sin) = model.layers[1], model.rope(0, 12)
    x, g = _x(model, 0), _x(model, 1)
    _, gx_ref, _ = _reference(block, x, g, cos, sin)
    _, chunk = forward_chunk(block, x, cos, sin)  # no attach
    gx = backward_chunk(chunk, g)
    assert not torch.allclose(gx, gx_ref, rtol=1e-6, atol=1e-9)
    model.cfg.seq_aux_loss_alpha = 0.0  # without the loss both agree
    _, gx_ref0, _ = _reference(block, x, g, cos, sin)
    _, chunk0 = forward_chunk(block, x, cos, sin)
    _close(backward_chunk(chunk0, g), gx_ref0)
