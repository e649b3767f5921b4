"""The DeepSeek-V3 model, one concept per module (norm, rope, mla, moe, mtp, transformer)."""

from .mla import MLA, MLACache
from .moe import Experts, Gate, MoE
from .mtp import MTPModule
from .norm import MLP, RMSNorm
from .transformer import IGNORE_INDEX, Block, DeepSeekV3, ModelCache, build_model

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
