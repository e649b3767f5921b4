"""FP8 checkpoints kept in FP8: projections that hold E4M3 weights and their block scales (§3.3, README_WEIGHTS).

The released DeepSeek-V3 weights store every attention and FFN projection as E4M3 with one fp32
``weight_scale_inv`` per 128×128 block: 1 byte per weight instead of BF16's 2 (671B: ≈ 0.7 TB instead of 1.3 TB).
``from_pretrained(path, keep_fp8=True)`` keeps them that way: it builds the model with the modules below in place of
those projections and copies the FP8 bits and the scales in as they are, so nothing is dequantised at load time.

Each module computes its GEMM in one of two ways (the official inference code's ``gemm_impl``):

* ``quantize_activations=False`` (default): dequantise the weight block by block to the activation's dtype just
  before the GEMM (the official ``bf16`` path; exactly the model that ``keep_fp8=False`` loads);
* ``quantize_activations=True``: quantise the activations per 1×128 tile as well and multiply FP8 by FP8 with the
  block-scaled GEMM (``dsv3lab.fp8.linear.scaled_mm``, whose backend follows ``fp8_gemm="auto"``: the Triton kernel
  on a CUDA GPU with compute capability ≥ 8.9, exactly emulated elsewhere) — the official ``fp8`` path, as
  DeepSeek-V3 serves.

The E4M3 bits are stored as ``uint8`` and the scales as the ``int32`` bits of fp32, so ``model.to(dtype)`` moves them
between devices but never rounds them. These modules are for inference: they hold buffers, not parameters.

Notebook: 10_inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..fp8.formats import E4M3
from ..fp8.linear import scaled_mm
from ..fp8.quant import BLOCK2D, TILE, QuantizedTensor, quantize, scale_shape
from ..model.moe import Experts
from .blockfp8 import dequantize_blocks


def fp8_matmul(
    x: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], quantize_activations: bool
) -> torch.Tensor:
    """y = x · Wᵀ for W given as E4M3 ``q`` [out, in] and its per-block ``scale_inv``; x: [..., in] -> [..., out]."""
    if not quantize_activations:
        return F.linear(x, dequantize_blocks(q, scale_inv, block, dtype=x.dtype))
    if tuple(block) != BLOCK2D:
        raise ValueError(
            f"quantize_activations=True needs weights in {BLOCK2D} blocks (the scales run along K in 128s); this "
            f"checkpoint has {tuple(block)} blocks: keep quantize_activations=False"
        )
    a = quantize(x.reshape(-1, x.shape[-1]).float(), TILE)  # [tokens, in] in 1×128 tiles
    w = QuantizedTensor.from_fp8(q, scale_inv, BLOCK2D)
    return scaled_mm(a, w, x.dtype, gemm="auto").view(*x.shape[:-1], q.shape[0])


class FP8WeightLinear(nn.Module):
    """A bias-free projection whose weight is E4M3 [out, in] with an fp32 scale per ``block`` (inference only).

    ``weight`` (read by the absorbed MLA path) dequantises on access, to ``dtype``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block: tuple[int, int],
        quantize_activations: bool = False,
        dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block, self.quantize_activations, self.dtype = tuple(block), quantize_activations, dtype
        self.register_buffer("weight_fp8", torch.empty(out_features, in_features, dtype=torch.uint8))  # E4M3 bits
        self.register_buffer(
            "weight_scale_inv", torch.empty(scale_shape((out_features, in_features), block), dtype=torch.int32)
        )  # fp32 bits

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_blocks(
            self.weight_fp8.view(E4M3), self.weight_scale_inv.view(torch.float32), self.block, dtype=self.dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        return fp8_matmul(
            x,
            self.weight_fp8.view(E4M3),
            self.weight_scale_inv.view(torch.float32),
            self.block,
            self.quantize_activations,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, E4M3, block={self.block}, "
            f"quantize_activations={self.quantize_activations}"
        )


class FP8Experts(Experts):
    """Routed experts whose stacked ``w1``/``w2``/``w3`` are E4M3 [E, out, in] with per-block scales [E, ., .].

    ``weight_of(name, i)`` dequantises one expert at a time for the loop path (all of them for the grouped path);
    with ``quantize_activations`` the loop path multiplies FP8 activations by the FP8 expert weight instead."""

    def __init__(
        self,
        cfg,
        block: tuple[int, int],
        quantize_activations: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        n_experts: int | None = None,
    ):
        nn.Module.__init__(self)  # no FP32 parameters: the buffers below replace them
        e = cfg.n_routed_experts if n_experts is None else n_experts  # fewer on a rank of expert parallelism
        self.n_experts, self.impl, self.fp8 = e, cfg.moe_impl, None
        self.block, self.quantize_activations, self.dtype = tuple(block), quantize_activations, dtype
        d, i = cfg.dim, cfg.moe_inter_dim
        for name, (rows, cols) in (("w1", (i, d)), ("w2", (d, i)), ("w3", (i, d))):
            self.register_buffer(f"{name}_fp8", torch.empty(e, rows, cols, dtype=torch.uint8))  # E4M3 bits
            self.register_buffer(
                f"{name}_scale_inv", torch.empty(e, *scale_shape((rows, cols), block), dtype=torch.int32)
            )  # fp32 bits

    def init_weights(self, std: float) -> None:
        raise TypeError("FP8Experts holds weights loaded from an FP8 checkpoint; it is not initialised or trained")

    def _stored(self, name: str, i: int | None):
        q = getattr(self, f"{name}_fp8").view(E4M3)
        s = getattr(self, f"{name}_scale_inv").view(torch.float32)
        return (q, s) if i is None else (q[i], s[i])

    def weight_of(self, name: str, i: int | None = None):
        q, s = self._stored(name, i)
        if i is None:  # the grouped path: every expert, dequantised
            return torch.stack([dequantize_blocks(q[j], s[j], self.block, dtype=self.dtype) for j in range(len(q))])
        return (q, s) if self.quantize_activations else dequantize_blocks(q, s, self.block, dtype=self.dtype)

    def _linear(self, x: torch.Tensor, w) -> torch.Tensor:
        if isinstance(w, tuple):  # (E4M3 weight, scales) of one expert, quantize_activations=True
            return fp8_matmul(x, *w, self.block, True)
        return F.linear(x, w.to(x.dtype))


def keep_fp8_modules(
    model: nn.Module, slot_names: list[str], block: tuple[int, int], quantize_activations: bool, dtype: torch.dtype
) -> None:
    """Replace, in place, every module that owns one of ``slot_names`` (state-dict names of FP8 checkpoint tensors:
    ``….weight`` of a projection or ``….experts.w1`` etc.) by its FP8 form, created on the current default device
    (call it under ``torch.device("meta")`` before ``to_empty``)."""
    for path in sorted({n.rsplit(".", 1)[0] for n in slot_names}):
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        old = getattr(parent, child)
        if isinstance(old, Experts):
            new = FP8Experts(model.cfg, block, quantize_activations, dtype, n_experts=old.n_experts)
        elif isinstance(old, nn.Linear) and old.bias is None:
            new = FP8WeightLinear(old.in_features, old.out_features, block, quantize_activations, dtype)
        else:
            raise TypeError(
                f"{path} is a {type(old).__name__}; only bias-free Linear projections and Experts hold FP8 weights"
            )
        setattr(parent, child, new)
