"""RMSNorm and the SwiGLU feed-forward network (DeepSeek-V3 §2.1.1, §2.1.2).

Notebook: 01_building_blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .linear import linear


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight, computed in fp32 and returned in the input dtype.

    Used before attention and the FFN (``attn_norm``, ``ffn_norm``), after the MLA latents (``q_norm``,
    ``kv_norm``), at the end of the model (``norm``) and inside each MTP module (``enorm``, ``hnorm``).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (self.dim,), eps=self.eps)  # [..., dim] in fp32
        return self.weight * y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1·x) ⊙ w3·x). The dense FFN of the first layers, and the shared experts of MoE layers.

    Official names: ``w1`` (gate, HF ``gate_proj``), ``w3`` (up, ``up_proj``), ``w2`` (down, ``down_proj``).
    ``cfg`` (optional) selects the projections' Linear class (FP8 when ``cfg.fp8``; see ``model/linear.py``).
    """

    def __init__(self, dim: int, inter_dim: int, cfg: ModelConfig | None = None):
        super().__init__()
        self.w1 = linear(cfg, dim, inter_dim)
        self.w2 = linear(cfg, inter_dim, dim)
        self.w3 = linear(cfg, dim, inter_dim)

    def init_weights(self, std: float) -> None:
        for lin in (self.w1, self.w2, self.w3):
            nn.init.normal_(lin.weight, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim] -> [..., inter_dim] -> [..., dim]
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
