"""Record every matrix multiplication torch executes, with copies of its operands: how the tests and notebook 07 see
that each GEMM of an FP8 layer (Fprop, Dgrad, Wgrad) really multiplies E4M3 values on the stated tiling.

    with GemmRecorder() as rec:
        layer(x).backward(dy)
    for name, (a, b, *rest) in rec.calls: ...   # "mm", "addmm", "_grouped_mm", … and the tensor operands

It is a ``TorchDispatchMode``: it sees the aten ops below autograd, whoever calls them (nn.Linear, F.linear, the
backward of a custom autograd function), so nothing in the code under test has to cooperate.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_grouped_mm", "dot", "mv", "_scaled_mm")


class GemmRecorder(TorchDispatchMode):
    """Records each GEMM-like aten op as ``(op name, [tensor operands])``; the operands are detached copies."""

    def __init__(self, ops: tuple[str, ...] = GEMM_OPS):
        super().__init__()
        self.ops = ops
        self.calls: list[tuple[str, list[torch.Tensor]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.ops:
            self.calls.append((name, [a.detach().clone() for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))
