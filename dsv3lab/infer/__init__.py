"""Inference and checkpoints: the official Hugging Face layout both ways (BF16 and block-FP8), generation with the
latent cache, and MTP speculative decoding (DeepSeek-V3 §3.4, §5.4.3).

Modules, one concept each:

* ``layout``      tensor names of the official layout, the MTP layers, the RoPE row permutation (rotate-half)
* ``blockfp8``    128×128 E4M3 weights and their ``weight_scale_inv`` (the checkpoint path only)
* ``checkpoint``  ``from_pretrained`` / ``save_pretrained`` (streaming, strict, atomic) and dsv3lab's plain folder
* ``conversion``  ``dsv3lab convert``: official <-> dsv3lab, FP8 <-> BF16, RoPE layout
* ``sampling``    greedy / temperature / top-k / top-p choice of the next token
* ``generation``  ``generate``: prefill + latent-cache decoding, batched prompts; ``speculative="mtp"`` for MTP drafts
* ``speculative`` MTP draft-and-verify decoding (the core of ``generate(speculative="mtp")``), acceptance statistics
* ``tensor_parallel`` ``load_sharded``: an official checkpoint over processes (heads split, routed experts split), each
  rank reading its own slices; what ``torchrun ... -m dsv3lab generate`` runs

Notebook: 10_inference.
"""

from .checkpoint import CheckpointError, LoadStats, from_pretrained, save_pretrained
from .conversion import convert, load_any
from .generation import Generation, generate, load_tokenizer, speculative_generate
from .speculative import SpeculativeStats
from .tensor_parallel import load_sharded

__all__ = [
    "CheckpointError",
    "LoadStats",
    "from_pretrained",
    "save_pretrained",
    "convert",
    "load_any",
    "Generation",
    "generate",
    "load_tokenizer",
    "SpeculativeStats",
    "speculative_generate",
    "load_sharded",
]
