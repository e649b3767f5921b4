"""The Transformer block of DeepSeek-V3 (§2, Fig. 2): pre-norm residuals around MLA and the FFN.

    x ← x + MLA(RMSNorm(x))
    x ← x + FFN(RMSNorm(x)),   FFN = the dense SwiGLU MLP in the first n_dense_layers layers, DeepSeekMoE after

The main model stacks ``n_layers`` of them; each MTP module holds one more (``mtp.MTPModule``).

Notebook: 00_tour.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .mla import MLA, MLACache
from .mlp import MLP
from .moe import MoE
from .norm import RMSNorm


class Block(nn.Module):
    """Pre-norm residual block: MLA, then a dense SwiGLU MLP (layer_id < n_dense_layers) or DeepSeekMoE."""

    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MLP(cfg.dim, cfg.inter_dim, cfg) if layer_id < cfg.n_dense_layers else MoE(cfg)

    def init_weights(self, std: float) -> None:
        self.attn_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attn.init_weights(std)
        self.ffn.init_weights(std)

    def forward(
        self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor, cache: MLACache | None = None
    ) -> torch.Tensor:
        # x: [b, s, dim]
        x = x + self.attn(self.attn_norm(x), start_pos, cos, sin, cache)
        x = x + self.ffn(self.ffn_norm(x))
        return x
