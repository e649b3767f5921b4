"""FP8 training, step by step (DeepSeek-V3 §3.3, Appendix B): one concept per module.

* :mod:`~dsv3lab.fp8.formats` — E4M3 and E5M2, every fact read from torch's float8 dtypes
* :mod:`~dsv3lab.fp8.quant`   — per-tensor, 1×128-tile and 128×128-block quantization, UE8M0 scales, error metrics,
  the outlier demonstration
* :mod:`~dsv3lab.fp8.accum`   — the limited-precision tensor-core accumulator and FP32 promotion every N_C = 128
* :mod:`~dsv3lab.fp8.linear`  — the FP8 Linear (Fprop/Dgrad/Wgrad in FP8) and grouped experts
* :mod:`~dsv3lab.fp8.optim`   — AdamW with BF16 moments and FP32 master weights
* :mod:`~dsv3lab.fp8.compare` — FP8 vs BF16 runs: smoothed losses and their relative difference
* :mod:`~dsv3lab.fp8.kernels` — Triton kernels (act_quant, weight_dequant, block-scaled GEMM); imported only on use

Importing this package never imports triton.

Notebook: 07_fp8.
"""

from .accum import emulated_gemm
from .formats import FP8Format, fp8_format, fp8_grid, round_to_fp8
from .linear import FP8Linear, FP8Recipe, fp8_grouped_linear, fp8_linear
from .optim import AdamW
from .quant import BLOCK2D, TILE, QuantizedTensor, dequantize, fake_quantize, quant_error, quantize, tiles_on_grid

__all__ = [
    "FP8Format",
    "fp8_format",
    "fp8_grid",
    "round_to_fp8",
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "fake_quantize",
    "quant_error",
    "tiles_on_grid",
    "TILE",
    "BLOCK2D",
    "emulated_gemm",
    "FP8Recipe",
    "FP8Linear",
    "fp8_linear",
    "fp8_grouped_linear",
    "AdamW",
]
