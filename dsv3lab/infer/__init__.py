"""Inference and checkpoints: the official Hugging Face layout both ways (BF16 and block-FP8), generation with the
latent cache, and MTP speculative decoding (DeepSeek-V3 §3.4, §5.4.3).

Modules: ``layout`` (tensor names, MTP and RoPE conventions), ``blockfp8`` (128×128 E4M3 weights and their
``weight_scale_inv``), ``checkpoint`` (``from_pretrained`` / ``save_pretrained`` / ``convert``), ``generate``
(prefill + latent-cache decoding, sampling), ``speculative`` (MTP draft-and-verify).

Notebook: 10_inference.
"""

from .checkpoint import CheckpointError, LoadStats, from_pretrained, save_pretrained

__all__ = ["CheckpointError", "LoadStats", "from_pretrained", "save_pretrained"]
