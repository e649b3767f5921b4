"""The one place that decides which Linear class the model's projections use.

Every projection that the paper runs in FP8 (§3.3: the Fprop/Dgrad/Wgrad GEMMs of attention projections, dense MLPs,
shared experts, the MTP ``eh_proj``) is created through :func:`linear`. The embedding, the output head and the router
always stay in high precision and are created directly.
"""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig


def linear(cfg: ModelConfig, in_features: int, out_features: int) -> nn.Module:
    """A bias-free projection ``in_features -> out_features`` (weight [out, in], as nn.Linear)."""
    del cfg  # the config will pick the FP8 recipe here
    return nn.Linear(in_features, out_features, bias=False)
