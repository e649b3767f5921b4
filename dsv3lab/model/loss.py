"""Next-token cross-entropy, and a fused form of the output head + cross-entropy that never holds the full logits.

Reference (``cross_entropy``): logits = head(norm(h)) [b, s, V] in fp32, then ``F.cross_entropy``. With a
vocabulary of V = 8,192 and 2,048 tokens a step that is a 64 MiB fp32 tensor, written by the head, read and
written again by log-softmax and its backward, and kept alive for the backward pass.

Fused (``linear_cross_entropy``): the tokens are processed in chunks of ``chunk`` rows. For each chunk the head's
logits [chunk, V] are computed, turned into the loss (log-sum-exp minus the target's logit) and, in the same pass,
into the gradients — d loss / d logits = (softmax − one-hot) / n — which are multiplied straight into the gradients
of the hidden states (p·W) and of the head's weight (pᵀ·h). Only those two small gradients are kept for the backward
pass, which merely scales them by the incoming gradient. The argmax of each row (the accuracy metric) comes out of
the same pass. The logits are rounded exactly as the reference rounds them (the head's GEMM in the input dtype —
bf16 under autocast — then fp32), so the two agree to summation order; ``tests/test_fast_paths.py`` checks loss,
gradients and argmax against the reference in fp32 and under bf16 autocast.

This is the "fused linear cross-entropy" of large-vocabulary training (e.g. Liger-Kernel), here in plain torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets equal to this are left out of every loss
DEFAULT_CHUNK = 256  # rows per chunk: a [256, 8192] fp32 block is 8 MiB (128–256 measured fastest on 2 cores)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose target is not IGNORE_INDEX. logits [b, s, V].

    With no valid target at all (every target ignored) the loss is defined as 0 — with a zero gradient — instead of
    the 0/0 = NaN of a plain mean, so such a micro-batch adds nothing to the step. The targets' range is checked where
    they enter (``DeepSeekV3.check_tokens``), not here on every call."""
    flat = targets.flatten()
    total = F.cross_entropy(logits.flatten(0, 1).float(), flat, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (flat != IGNORE_INDEX).sum().clamp_min(1)  # [] — divided on the device, no host sync


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = mean CE(x @ wᵀ, targets), gradients computed in the forward pass chunk by chunk (see the module)."""

    @staticmethod
    def forward(ctx, x, w, targets, chunk):  # x [N, d], w [V, d], targets [N] -> loss [], argmax [N]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_valid = (targets != IGNORE_INDEX).sum().clamp_min(1)  # [] on the device
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        argmax = torch.empty(targets.shape, dtype=torch.int64, device=x.device)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        for start in range(0, x.shape[0], chunk):
            xc, tc = x[start : start + chunk], targets[start : start + chunk]
            logits = (xc @ w.t()).float()  # [c, V]: rounded like the reference head, then fp32
            valid = tc != IGNORE_INDEX  # [c]
            safe = tc.clamp_min(0)[:, None]  # [c, 1] (ignored rows point at class 0, masked below)
            target_logit = logits.gather(1, safe)[:, 0]  # [c]
            top, argmax[start : start + chunk] = logits.max(dim=-1)  # the first maximum, as argmax
            e = logits.sub_(top[:, None]).exp_()  # exp(logits - max), in place of the logits: [c, V]
            total = e.sum(dim=-1)  # [c]
            lse = top + total.log()  # log-sum-exp [c]
            loss = loss + ((lse - target_logit) * valid).sum()
            if need_x or need_w:
                p = e.div_(total[:, None])  # softmax [c, V]
                p.scatter_add_(1, safe, -valid[:, None].to(p.dtype))  # − one-hot at the target
                p.mul_(valid[:, None] / n_valid)  # ignored rows: no gradient; the mean's 1/n
                p = p.to(x.dtype)
                if need_x:
                    grad_x[start : start + chunk] = p @ w  # [c, d]
                if need_w:
                    grad_w += (p.t() @ xc).float()  # [V, d]
        ctx.save_for_backward(grad_x, grad_w)
        ctx.mark_non_differentiable(argmax)
        ctx.w_dtype = w.dtype
        return loss / n_valid, argmax

    @staticmethod
    def backward(ctx, grad_loss, _grad_argmax):
        grad_x, grad_w = ctx.saved_tensors
        gx = None if grad_x is None else grad_x * grad_loss.to(grad_x.dtype)
        gw = None if grad_w is None else (grad_w * grad_loss).to(ctx.w_dtype)
        return gx, gw, None, None


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output head and the mean cross-entropy fused: ``cross_entropy(x @ weightᵀ, targets)`` without the
    [N, V] logits. x [..., d] (the final norm's output), weight [V, d], targets [...] (IGNORE_INDEX allowed).

    Returns (loss [], argmax of the logits [...]). Under autocast the GEMMs run in the autocast dtype, as ``nn.Linear``
    would; the loss, the softmax and the weight gradient's sum stay in fp32."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)  # the casts autocast would insert before the head's GEMM
    elif weight.dtype != x.dtype:
        x = x.to(weight.dtype)
    with torch.autocast(device_type, enabled=False):
        loss, argmax = _LinearCrossEntropy.apply(x.flatten(0, -2), weight, targets.flatten(), chunk)
    return loss, argmax.view(targets.shape)
