"""AdamW with low-precision moments and FP32 master weights (DeepSeek-V3 §3.3.3, "Low-Precision Optimizer States").

DeepSeek-V3 keeps the master weights and the gradients in FP32 but stores AdamW's first and second moments
(m, v) in **BF16**, halving their memory without observable degradation. This optimizer does the same: each step
reads the moments as FP32, applies exactly the update of ``torch.optim.AdamW`` (decoupled weight decay, bias
correction), and writes them back rounded to ``moment_dtype``. With ``moment_dtype=torch.float32`` it reproduces
``torch.optim.AdamW`` (the tests check this), so the difference is only the rounding of the stored moments.

The trainer uses it with ``TrainConfig(adam_moments="bf16")`` (``--set adam_moments=bf16``). The param groups hold
the dtype by name (``"bfloat16"``), so a checkpoint's ``state.json`` stays plain JSON, and ``load_state_dict`` puts
the moments back in that dtype (``torch.optim.Optimizer`` would cast them to the parameters' FP32), so a resumed run
rounds exactly as an uninterrupted one.

Notebook: 07_fp8.
"""

from __future__ import annotations

import math

import torch


class AdamW(torch.optim.Optimizer):
    """AdamW whose ``exp_avg``/``exp_avg_sq`` state is stored in ``moment_dtype`` (default BF16).

    Parameters (the master weights) keep their own dtype, normally FP32. Same arguments and update as
    ``torch.optim.AdamW``; ``lr`` may be changed in ``param_groups`` by any scheduler.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        moment_dtype: torch.dtype = torch.bfloat16,
    ):
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        super().__init__(
            params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, moment_dtype=_dtype_name(moment_dtype))
        )

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["moment_dtype"] = _dtype_name(group["moment_dtype"])
            mdt = getattr(torch, group["moment_dtype"])
            for p in group["params"]:
                state = self.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:  # the values were stored in mdt, so this cast is exact
                        state[key] = state[key].to(mdt)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd, mdt = group["lr"], group["eps"], group["weight_decay"], getattr(torch, group["moment_dtype"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=mdt, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=mdt, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"]
                grad = p.grad.float()
                m = state["exp_avg"].float().lerp_(grad, 1 - beta1)  # m ← β1 m + (1 − β1) g, in FP32
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(m)  # stored rounded to moment_dtype
                state["exp_avg_sq"].copy_(v)
                master = p.float() if p.dtype != torch.float32 else p
                master.mul_(1 - lr * wd)  # decoupled weight decay
                denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                master.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
                if master is not p:
                    p.copy_(master)
        return loss


def _dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` / ``"bfloat16"`` / ``"torch.bfloat16"`` → ``"bfloat16"``; a floating dtype only."""
    name = str(dtype).removeprefix("torch.")
    resolved = getattr(torch, name, None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"moment_dtype must be a floating dtype (bfloat16, float32), got {dtype}")
    return name
