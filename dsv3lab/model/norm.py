"""RMSNorm (DeepSeek-V3 §2.1.1; Zhang & Sennrich 2019).

    RMSNorm(x) = x / sqrt(mean(x²) + ε) · g

Notebook: 01_building_blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight: the normalisation in fp32, cast back to the input dtype, then scaled by
    the gain (so a bf16 model computes in bf16 after the fp32 normalisation).

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
