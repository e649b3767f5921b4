"""The DeepSeek-V3 model, one concept per module: norm, mlp, rope, mla, moe, block, mtp, transformer (and linear, the
factory that picks FP8 or plain projections)."""

from .block import Block
from .mla import MLA, MLACache
from .mlp import MLP
from .moe import Experts, Gate, MoE
from .mtp import MTPModule
from .norm import RMSNorm
from .transformer import IGNORE_INDEX, DeepSeekV3, ModelCache, build_model

__all__ = [
    "MLA",
    "MLACache",
    "MoE",
    "Experts",
    "Gate",
    "MTPModule",
    "MLP",
    "RMSNorm",
    "IGNORE_INDEX",
    "Block",
    "DeepSeekV3",
    "ModelCache",
    "build_model",
]
