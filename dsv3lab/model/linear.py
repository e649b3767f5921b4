"""The one place that decides which Linear class the model's projections use.

Every projection that DeepSeek-V3 runs in FP8 (§3.3: the Fprop/Dgrad/Wgrad GEMMs of the MLA projections ``wq``,
``wq_a``, ``wq_b``, ``wkv_a``, ``wkv_b``, ``wo``, the dense MLP and shared-expert ``w1``/``w2``/``w3`` and the MTP
``eh_proj``) is created through :func:`linear`; the routed experts ask :func:`fp8_recipe` (they hold stacked
weights, see ``moe.Experts``). The embedding, the output head and the router always stay in high precision and are
created directly.

With ``cfg.fp8`` the factory returns :class:`dsv3lab.fp8.FP8Linear`, a subclass of ``nn.Linear`` with the same
``weight`` (so state-dict keys such as ``layers.0.attn.wq_a.weight`` are identical). ``dsv3lab.fp8`` is plain torch;
its Triton kernels are imported only when a kernel GEMM runs.
"""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from ..fp8.linear import FP8Linear, FP8Recipe


def fp8_recipe(cfg: ModelConfig | None):
    """The FP8 recipe of ``cfg`` (``None`` when FP8 is off)."""
    if cfg is None or not cfg.fp8:
        return None
    return FP8Recipe.from_config(cfg)


def linear(cfg: ModelConfig | None, in_features: int, out_features: int) -> nn.Linear:
    """A bias-free projection ``in_features -> out_features`` (weight [out, in]): ``nn.Linear``, or the FP8 Linear
    when ``cfg.fp8``."""
    recipe = fp8_recipe(cfg)
    if recipe is None:
        return nn.Linear(in_features, out_features, bias=False)
    return FP8Linear(in_features, out_features, recipe=recipe)
