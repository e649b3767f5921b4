"""dsv3lab — a research notebook workbench for DeepSeek-V3 (arXiv 2412.19437).

Quick start::

    import dsv3lab
    cfg = dsv3lab.ModelConfig.preset("toy")
    model = dsv3lab.build_model(cfg, seed=0)
    logits, losses = model(tokens, targets)

    dsv3lab.save_pretrained(model, "ckpt")                  # the official Hugging Face layout
    model = dsv3lab.from_pretrained("ckpt")
    out = dsv3lab.generate(model, tokens[0].tolist(), max_new_tokens=32)
"""

from .accounting import model_stats
from .config import PRESETS, ModelConfig
from .infer import from_pretrained, generate, save_pretrained, speculative_generate
from .model import DeepSeekV3, build_model
from .utils import get_device, seed_everything, setup_notebook, versions
from .version import __version__

__all__ = [
    "PRESETS",
    "ModelConfig",
    "DeepSeekV3",
    "build_model",
    "from_pretrained",
    "save_pretrained",
    "generate",
    "speculative_generate",
    "model_stats",
    "get_device",
    "seed_everything",
    "setup_notebook",
    "versions",
    "__version__",
]
