"""The SwiGLU feed-forward network (DeepSeek-V3 §2.1.2; the FFN of every Transformer block since LLaMA).

    MLP(x) = w2( silu(w1·x) ⊙ w3·x )

It is the dense FFN of the first ``n_dense_layers`` layers and the shared experts of the MoE layers (each routed
expert computes the same function with stacked weights, see ``moe.Experts``).

Notebook: 01_building_blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .linear import linear


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1·x) ⊙ w3·x).

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
