"""Overlapping a forward chunk with a backward chunk (DeepSeek-V3 §3.2.1, Fig. 4) for a DeepSeek-V3 block.

DualPipe pairs the forward of one micro-batch with the backward of another and rearranges their pieces so that
each all-to-all of one runs while the other computes. A block's forward chunk has four pieces,

    attention  x1 = x + MLA(RMSNorm(x))                                  compute
    dispatch   u = RMSNorm(x1); route; gather each token once per chosen expert, grouped by expert
                                                                          (the all-to-all under expert parallelism)
    mlp        every routed expert on its tokens, the shared experts on all tokens       compute
    combine    y = x1 + Σ_k g_k · expert_k(u) + shared(u)                 (the all-to-all back)

and its backward runs them in reverse, the compute pieces split ZeroBubble-style into a backward for the input
(B: what the previous piece needs) and a backward for the weights (W: needed by nobody). The overlapped pair runs

    B combine | F attention | B+W mlp | F dispatch | B+W dispatch | F mlp | B+W attention | F combine

so every communication piece of one micro-batch sits next to a compute piece of the other. On a GPU the two
streams run at once; here they run one after the other, and what matters is that the result is *the same*:
:func:`overlapped_forward_backward` returns exactly what forward-then-backward returns (tests). The time the overlap
saves is a question for :mod:`dsv3lab.parallel.simulator` (``a2a``, ``overlap``): a CPU cannot show it.

Pieces are :class:`Part` objects: a function run on detached copies of its inputs, so that its backward can be run
on its own — for the input (``backward_input``), for the weights later (``backward_weight``), or both
(``backward_full``). Splitting the backward this way traverses a piece's graph twice; DeepSeek's and torch's
zero-bubble code avoid that by saving the weights' input gradients, at more code.

The dispatch and combine here are local (a gather and a scatter-add); dsv3lab's expert-parallel runtime replaces
them with ``all_to_all_single`` on real ranks. The MoE routing bookkeeping (``tokens_per_expert``, ``last_counts``,
``last_indices``, ``last_aux_loss``) is kept exactly as :class:`dsv3lab.model.MoE` keeps it. Notebook: 08_dualpipe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Block, Experts, MoE


class Part:
    """A piece of a chunk between detached boundaries: ``forward(*inputs)`` runs ``fn`` on leaf copies of the
    inputs (floating ones require grad) and returns its outputs detached; the backward methods then work on this
    piece alone. ``params``: the parameters ``fn`` uses (their gradients are accumulated into ``.grad``)."""

    def __init__(self, name: str, fn: Callable[..., Sequence[torch.Tensor]], params: Sequence[nn.Parameter] = ()):
        self.name, self.fn = name, fn
        self.params = [p for p in params if p.requires_grad]
        self.inputs: list[torch.Tensor] = []
        self.outputs: tuple[torch.Tensor, ...] = ()
        self.roots: list[torch.Tensor] = []
        self.root_grads: list[torch.Tensor] = []

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.inputs = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
        with torch.enable_grad():
            out = self.fn(*self.inputs)
        self.outputs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return tuple(o.detach() for o in self.outputs)

    def _roots(self, grads: Sequence[torch.Tensor | None]) -> None:
        pairs = [(o, g) for o, g in zip(self.outputs, grads) if g is not None and o.requires_grad]
        self.roots, self.root_grads = [o for o, _ in pairs], [g for _, g in pairs]

    def _input_grads(self, got) -> tuple[torch.Tensor | None, ...]:
        it = iter(got)
        return tuple(next(it) if x.requires_grad else None for x in self.inputs)

    def backward_input(self, grads: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor | None, ...]:
        """B: the gradients of the inputs (None for integer inputs), keeping the graph for :meth:`backward_weight`."""
        self._roots(grads)
        need = [x for x in self.inputs if x.requires_grad]
        if not self.roots or not need:
            return tuple(None for _ in self.inputs)
        got = torch.autograd.grad(self.roots, need, self.root_grads, retain_graph=True, allow_unused=True)
        return self._input_grads(got)

    def backward_weight(self) -> None:
        """W: accumulate the weights' gradients (after :meth:`backward_input`), then free the graph."""
        if self.roots and self.params:
            got = torch.autograd.grad(self.roots, self.params, self.root_grads, allow_unused=True)
            _accumulate(self.params, got)
        self._free()

    def backward_full(self, grads: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor | None, ...]:
        """B and W in one pass (the fused full backward)."""
        self._roots(grads)
        need = [x for x in self.inputs if x.requires_grad]
        if not self.roots:
            self._free()
            return tuple(None for _ in self.inputs)
        got = torch.autograd.grad(self.roots, need + self.params, self.root_grads, allow_unused=True)
        _accumulate(self.params, got[len(need) :])
        out = self._input_grads(got[: len(need)])
        self._free()
        return out

    def _free(self) -> None:
        self.inputs, self.outputs, self.roots, self.root_grads = [], (), [], []


def _accumulate(params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor | None]) -> None:
    for p, g in zip(params, grads):
        if g is not None:
            p.grad = g.detach().clone() if p.grad is None else p.grad + g


def _params(*modules: nn.Module | None) -> list[nn.Parameter]:
    return [p for m in modules if m is not None for p in m.parameters()]


# ---------------------------------------------------------------------------------------------- one block
def supports_parts(block: Block) -> bool:
    """A block whose FFN is a plain :class:`MoE` (routed experts in full precision): it splits into the four
    pieces. Dense blocks and FP8 or otherwise specialised experts run as one piece."""
    moe = block.ffn
    return isinstance(moe, MoE) and type(moe.experts) is Experts and moe.experts.fp8 is None


@dataclass
class BlockChunk:
    """A block's forward chunk for one micro-batch, kept for its backward: the pieces in forward order."""

    parts: list[Part]
    aux: float = 0.0  # the balance-loss value this chunk added (0 when off)
    routing: dict = field(default_factory=dict)


def _route(moe: MoE, x1: torch.Tensor, shape: tuple[int, int, int], routing: dict):
    """The dispatch piece: RMSNorm, the router (as ``MoE.forward``, with its bookkeeping), and the gather of each
    token once per chosen expert, grouped by expert — what expert parallelism sends with its all-to-all."""
    b, s, d = shape
    flat = x1.reshape(b * s, d)  # [T, d]
    weights, indices = moe.route(flat, b, s)  # [T, K], [T, K], with MoE.forward's bookkeeping
    counts = moe.last_counts
    k = indices.shape[1]
    order = indices.flatten().argsort(stable=True)  # (token, slot) pairs grouped by expert, tokens in order
    routing.update(token=order // k, counts=counts.tolist())
    routed = flat[order // k]  # [T*K, d]
    gate = weights.flatten()[order]  # [T*K]
    return routed, gate, flat, moe.last_aux_loss


def _experts(moe: MoE, routed: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The mlp piece for the routed experts: expert e's SwiGLU on its contiguous run of tokens. [T*K, d]"""
    w = moe.experts
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            xe = routed[start : start + n]  # [n_e, d]
            outs.append(F.linear(F.silu(F.linear(xe, w.w1[e])) * F.linear(xe, w.w3[e]), w.w2[e]))
        start += n
    return torch.cat(outs) if outs else routed.new_zeros(routed.shape)


def _combine(x1: torch.Tensor, expert_out: torch.Tensor, gate: torch.Tensor, shared, routing: dict) -> torch.Tensor:
    """The combine piece: each expert's outputs, weighted by the gate, added back to their tokens (expert by expert,
    as the loop implementation does), then the shared experts and the residual."""
    b, s, d = x1.shape
    y = torch.zeros(b * s, d, dtype=x1.dtype, device=x1.device)
    token, start = routing["token"], 0
    for n in routing["counts"]:
        if n:
            rows = slice(start, start + n)
            y.index_add_(0, token[rows], (expert_out[rows] * gate[rows, None]).to(y.dtype))
        start += n
    if shared is not None:
        y = y + shared
    return x1 + y.view(b, s, d)


def block_parts(block: Block, cos: torch.Tensor, sin: torch.Tensor, routing: dict, attach) -> list[Part]:
    """The four :class:`Part` objects of an MoE block (see the module docstring). ``attach(t, aux)`` adds the
    balance loss ``aux`` to the backward through ``t`` (:func:`dsv3lab.parallel.pipeline.attach_aux`)."""
    moe: MoE = block.ffn
    shape: list[tuple[int, int, int]] = []

    def attention(x):
        shape.append(tuple(x.shape))
        return (x + block.attn(block.attn_norm(x), 0, cos, sin),)

    def dispatch(x1):
        routed, gate, flat, aux = _route(moe, block.ffn_norm(x1), shape[0], routing)
        return attach(routed, aux), gate, flat

    def mlp(routed, flat):
        shared = moe.shared_experts(flat) if moe.shared_experts is not None else None
        out = _experts(moe, routed, routing["counts"])
        return (out,) if shared is None else (out, shared)

    def combine(x1, expert_out, gate, *shared):
        return (_combine(x1, expert_out, gate, shared[0] if shared else None, routing),)

    return [
        Part("attention", attention, _params(block.attn_norm, block.attn)),
        Part("dispatch", dispatch, _params(block.ffn_norm, moe.gate)),
        Part("mlp", mlp, _params(moe.experts, moe.shared_experts)),
        Part("combine", combine),
    ]


class BlockForward:
    """A block's forward chunk, one piece at a time (the pieces' wiring in one place)."""

    def __init__(self, block: Block, x: torch.Tensor, cos, sin, attach):
        self.chunk = BlockChunk([])
        self.chunk.parts = block_parts(block, cos, sin, self.chunk.routing, attach)
        self.block, self.x = block, x
        self.steps = iter(self._steps())

    def _steps(self):
        attention, dispatch, mlp, combine = self.chunk.parts
        (x1,) = attention.forward(self.x)
        yield
        routed, gate, flat = dispatch.forward(x1)
        aux = self.block.ffn.last_aux_loss
        self.chunk.aux = float(aux.detach()) if aux is not None else 0.0
        yield
        mlp_out = mlp.forward(routed, flat)
        yield
        (self.y,) = combine.forward(x1, mlp_out[0], gate, *mlp_out[1:])
        yield

    def step(self) -> None:
        next(self.steps)


class BlockBackward:
    """A block's backward chunk, one piece at a time: combine (B), mlp (B, W), dispatch (B, W), attention (B, W).
    The gradients between pieces are routed here; ``weights`` False leaves the W's for :func:`backward_weight`."""

    def __init__(self, chunk: BlockChunk, grad_y: torch.Tensor, weights: bool = True):
        self.chunk, self.grad_y, self.weights = chunk, grad_y, weights
        self.steps = iter(self._steps())

    def _run(self, part: Part, grads):
        if self.weights:
            return part.backward_full(grads)
        return part.backward_input(grads)

    def _steps(self):
        attention, dispatch, mlp, combine = self.chunk.parts
        g_x1, g_out, g_gate, *g_shared = self._run(combine, [self.grad_y])
        yield
        g_mlp = self._run(mlp, [g_out] + g_shared)  # (routed, flat)
        yield
        g_disp = self._run(dispatch, [g_mlp[0], g_gate, g_mlp[1]])  # grads of (routed, gate, flat) -> x1
        yield
        (self.grad_x,) = self._run(attention, [g_x1 + g_disp[0]])
        yield

    def step(self) -> None:
        next(self.steps)


def forward_chunk(block: Block, x: torch.Tensor, cos, sin, attach=lambda t, aux: t) -> tuple[torch.Tensor, BlockChunk]:
    """A block's forward on x [b, s, d] piece by piece: (y [b, s, d], the chunk kept for the backward)."""
    fwd = BlockForward(block, x, cos, sin, attach)
    for _ in range(4):
        fwd.step()
    return fwd.y, fwd.chunk


def backward_chunk(chunk: BlockChunk, grad_y: torch.Tensor, weights: bool = True) -> torch.Tensor:
    """The backward of a :func:`forward_chunk`: returns the input gradient; with ``weights`` False (B) the weight
    gradients wait for :func:`backward_weight` (W)."""
    bwd = BlockBackward(chunk, grad_y, weights)
    for _ in range(4):
        bwd.step()
    return bwd.grad_x


def backward_weight(chunk: BlockChunk) -> None:
    """W: the weight gradients of a chunk whose input gradient :func:`backward_chunk` (``weights=False``) computed."""
    for part in reversed(chunk.parts):
        part.backward_weight()


def overlapped_forward_backward(
    block_f: Block, x_f: torch.Tensor, cos, sin, chunk_b: BlockChunk, grad_b: torch.Tensor, attach=lambda t, aux: t
) -> tuple[torch.Tensor, BlockChunk, torch.Tensor]:
    """The F&B pair of Fig. 4: the forward of ``block_f`` on ``x_f`` interleaved with the full backward of
    ``chunk_b`` (a forward chunk of another micro-batch, maybe of another block) for the output gradient ``grad_b``.

    Returns (y_f, the new forward chunk, the input gradient of chunk_b); weight gradients are accumulated. Equal to
    ``forward_chunk(block_f, x_f)`` followed by ``backward_chunk(chunk_b, grad_b)`` — only the order differs.
    """
    fwd = BlockForward(block_f, x_f, cos, sin, attach)
    bwd = BlockBackward(chunk_b, grad_b, weights=True)
    for _ in range(4):  # B combine | F attention ; B+W mlp | F dispatch ; B+W dispatch | F mlp ; B+W attn | F combine
        bwd.step()
        fwd.step()
    return fwd.y, fwd.chunk, bwd.grad_x
