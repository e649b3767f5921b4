"""Multi-token prediction (DeepSeek-V3 §2.2, Eq. 21–25).

D sequential modules extend the prediction to D additional tokens while keeping the complete causal chain: module k
combines the previous depth's representation of token i with the embedding of token i+k,

    h'_i^k = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})]       (M_k: ``eh_proj``, 2d -> d)
    h_i^k  = TRM_k(h'^k)_i                                          (one Transformer block)
    P_{i+k+1}^k = OutHead(RMSNorm(h_i^k))                           (the main model's output head, shared)

The concatenation order puts the embedding first, as the released weights (and vLLM) do; the paper's Eq. 21 writes
h first. The embedding and output head are shared with the main model. Loss: L^k is the cross-entropy of depth k on
its T - k valid positions, and L_MTP = λ/D · Σ_k L^k. At inference the modules can be dropped, or used to draft
tokens for speculative decoding.

Notebook: 05_mtp.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .block import Block
from .linear import linear
from .norm import RMSNorm


class MTPModule(nn.Module):
    """The k-th MTP module. HF names: ``enorm``, ``hnorm``, ``eh_proj``, the block, ``shared_head.norm``."""

    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        self.depth = depth
        self.enorm, self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps), RMSNorm(cfg.dim, cfg.norm_eps)  # for Emb(t), h
        self.eh_proj = linear(cfg, 2 * cfg.dim, cfg.dim)  # M_k (FP8 when cfg.fp8)
        self.block = Block(cfg.n_layers + depth - 1, cfg)  # a full Transformer block, MoE like the layers it follows
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)  # applied before the shared output head

    def init_weights(self, std: float) -> None:
        for norm in (self.enorm, self.hnorm, self.norm):
            norm.init_weights()
        nn.init.normal_(self.eh_proj.weight, std=std)
        self.block.init_weights(std)

    def forward(
        self,
        h_prev: torch.Tensor,
        emb_next: torch.Tensor,
        start_pos: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache=None,
    ) -> torch.Tensor:
        """h_prev: [b, s, d] (depth k-1 at positions i), emb_next: [b, s, d] (Emb(t_{i+k})). Returns h^k [b, s, d]."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))  # [b, s, 2d] -> [b, s, d]
        return self.block(h, start_pos, cos, sin, cache)
