"""dsv3lab's pipeline engine: runs any schedule of :mod:`dsv3lab.parallel.schedules` on ``torch.distributed`` —
DualPipe above all, which ``torch.distributed.pipelining`` does not have (DeepSeek-V3 §3.2.1).

The engine interprets the rank's action list, lowered with :func:`~dsv3lab.parallel.schedules.with_comms`:

* every receive is posted at the start of the step (``irecv``) and waited for at its RECV entry, every send is an
  ``isend`` right after the chunk that produced the tensor (so no rank blocks another: the checker has already
  proved the order free of deadlocks); tensors between two stages of one rank are handed over directly;
* F runs a stage's units — embedding, blocks, head + MTP + loss — each a :class:`~dsv3lab.parallel.overlap.Part`
  or, for MoE blocks, the four pieces of :mod:`dsv3lab.parallel.overlap`;
* B runs the units' input gradients (keeping what W needs), W their weight gradients, BW both;
* FB interleaves the forward of one stage with the full backward of another piece by piece — the
  ``overlapped_forward_backward`` of two DeepSeek-V3 blocks when both units are MoE blocks.

DualPipe's two directions are two chains of virtual stages; rank r holds model stage r of direction 0 and model
stage PP−1−r of direction 1, i.e. both copies of a stage live on mirror ranks, whose gradients
:func:`dsv3lab.parallel.pipeline.finish_step` sums. Notebook: 08_dualpipe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .overlap import BlockBackward, BlockChunk, BlockForward, Part, backward_weight, supports_parts
from .schedules import Action, check_schedule, make_schedule, with_comms
from .stages import attach_aux


def _params(*modules) -> list:
    return [p for m in modules if m is not None for p in m.parameters()]


@dataclass
class StageChunk:
    """A stage's forward chunk for one micro-batch: its units in order, whether it carries the MTP embedding."""

    units: list[Part | BlockChunk] = field(default_factory=list)
    with_emb: bool = False
    outputs: tuple = ()


class StageRunner:
    """Forward and backward of one :class:`~dsv3lab.parallel.stages.StageModule`, unit by unit, as generators that
    yield after every piece (so that two of them can be interleaved)."""

    def __init__(self, stage, loss_fn, overlap: bool = True):
        self.stage, self.loss_fn, self.overlap = stage, loss_fn, overlap

    def forward(self, inputs: tuple, target: torch.Tensor | None, chunk: StageChunk):
        """Generator: runs the forward; ``chunk.outputs`` is the stage's output (or (loss,) on the last stage)."""
        st = self.stage
        st.begin()
        if st.is_first:
            part = Part("embed", st.embed_tokens, _params(st.embed))
            x = part.forward(*inputs)
            chunk.units.append(part)
            yield
        else:
            x = tuple(inputs)
        h, emb = x[0], (x[1] if len(x) > 1 else None)
        chunk.with_emb = emb is not None
        for i, block in enumerate(st.layers):
            if self.overlap and supports_parts(block):
                fwd = BlockForward(block, h, *st.rope(h.shape[1]), attach_aux)
                for _ in range(4):
                    fwd.step()
                    yield
                st._aux += fwd.chunk.aux
                h = fwd.y
                chunk.units.append(fwd.chunk)
            else:
                part = Part(f"block {i}", lambda h, i=i: (st.run_block(i, h),), _params(block))
                (h,) = part.forward(h)
                chunk.units.append(part)
                yield
        if st.is_last:

            def head(h, *emb):
                return (self.loss_fn(st.run_head(h, emb[0] if emb else None), target),)

            part = Part("head", head, _params(st.norm, st.head, st.mtp))
            chunk.outputs = part.forward(h, *((emb,) if emb is not None else ()))
            chunk.units.append(part)
            yield
        else:
            chunk.outputs = (h, emb) if emb is not None else (h,)
        st.end()

    def backward(self, chunk: StageChunk, grads: tuple | None, weights: bool, result: list):
        """Generator: the backward for the stage's outputs' gradients ``grads`` (None on the last stage: the loss);
        appends the stage's input gradients to ``result``. ``weights`` False: B only, :meth:`weight` later."""
        if grads is None:
            g_h, g_emb = None, None
        else:
            g_h, g_emb = grads[0], (grads[1] if chunk.with_emb else None)
        for unit in reversed(chunk.units):
            if isinstance(unit, BlockChunk):
                bwd = BlockBackward(unit, g_h, weights)
                for _ in range(4):
                    bwd.step()
                    yield
                g_h = bwd.grad_x
                continue
            run = unit.backward_full if weights else unit.backward_input
            if unit.name == "head":
                got = run([torch.ones((), device=unit.outputs[0].device)])  # d loss / d loss
                g_h = got[0]
                if chunk.with_emb:
                    g_emb = got[1] if g_emb is None else g_emb + got[1]
            elif unit.name == "embed":
                run([g_h, g_emb] if chunk.with_emb else [g_h])
            else:
                (g_h,) = run([g_h])
            yield
        if not self.stage.is_first:
            result.append((g_h, g_emb) if chunk.with_emb else (g_h,))

    @staticmethod
    def weight(chunk: StageChunk) -> None:
        """W: the weight gradients of every unit whose input gradient ran."""
        for unit in reversed(chunk.units):
            backward_weight(unit) if isinstance(unit, BlockChunk) else unit.backward_weight()


def _run(gen) -> None:
    for _ in gen:
        pass


def _interleave(fwd, bwd) -> None:
    """Alternate the pieces of a backward and a forward generator (B first, as in Fig. 4) until both are done."""
    active = [bwd, fwd]
    while active:
        for g in list(active):
            if next(g, StopIteration) is StopIteration:
                active.remove(g)


class ScheduleExecutor:
    """Runs a dsv3lab schedule for pipeline rank ``pp_rank`` of ``group``. ``stages``: the rank's
    :class:`StageModule` objects (the layout's model stages); ``loss_fn``: the last stage's loss."""

    def __init__(self, name, layout, stages, pp_rank: int, group, loss_fn, n_micro: int, overlap: bool = True):
        self.schedule = check_schedule(make_schedule(name, layout.n_stages, n_micro))
        if self.schedule.n_ranks != layout.pp:
            raise ValueError(f"{name} with {layout.n_stages} stages needs {self.schedule.n_ranks} pipeline ranks")
        self.lowered = with_comms(self.schedule)
        self.rank, self.group, self.n_micro = pp_rank, group, n_micro
        by_model = {s.index: s for s in stages}
        self.runners = {
            v: StageRunner(by_model[self.schedule.model_stage[v]], loss_fn, overlap)
            for v in self.schedule.stages_of(pp_rank)
        }
        self._loss_mbs: list[int] = []
        self._aux_mbs: dict[int, list[int]] = {}

    def loss_micro_batches(self) -> list[int]:
        """The micro-batch of each loss this rank computed in the last step, in order."""
        return list(self._loss_mbs)

    def aux_micro_batches(self) -> dict[int, list[int]]:
        """For each model stage on this rank, the micro-batch of each entry of its ``aux_log``."""
        return {k: list(v) for k, v in self._aux_mbs.items()}

    def _peer(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def _tag(self, kind: int, producer: int, mb: int, i: int) -> int:
        return ((producer * self.n_micro + mb) * 2 + kind) * 4 + i

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> list[tuple[Action, float, float]]:
        """One forward and backward over ``n_micro`` micro-batches of (tokens, targets) [B, s]. Gradients are
        accumulated (not yet divided by the micro-batch count). Returns (action, start, end) per compute action."""
        s, ops = self.schedule, self.lowered.actions[self.rank]
        toks, tgts = tokens.chunk(self.n_micro), targets.chunk(self.n_micro)
        mb_shape = (toks[0].shape[0], toks[0].shape[1], next(iter(self.runners.values())).stage.cfg.dim)
        n_tensors = 2 if next(iter(self.runners.values())).stage.cfg.n_mtp else 1
        self._loss_mbs, self._aux_mbs = [], {}
        recvs: dict[tuple[str, int, int], tuple[list[torch.Tensor], list]] = {}
        for a in ops:  # post every receive now; each is waited for at its RECV entry
            if a.kind in ("RECV_F", "RECV_B"):
                prev, nxt = s.neighbours(a.stage, a.mb)
                producer, kind = (prev, 0) if a.kind == "RECV_F" else (nxt, 1)
                bufs = [torch.empty(mb_shape, device=tokens.device) for _ in range(n_tensors)]
                works = [
                    dist.irecv(b, src=self._peer(a.peer), group=self.group, tag=self._tag(kind, producer, a.mb, i))
                    for i, b in enumerate(bufs)
                ]
                recvs[(a.kind, a.stage, a.mb)] = (bufs, works)
        sends: list = []
        outputs: dict[tuple[int, int], tuple] = {}  # (stage, mb) -> forward output (to send or hand over)
        input_grads: dict[tuple[int, int], tuple] = {}  # (stage, mb) -> input gradients (to send or hand over)
        chunks: dict[tuple[int, int], StageChunk] = {}
        events = []

        def fwd_inputs(v, mb):
            prev, _ = s.neighbours(v, mb)
            if prev is None:
                return (toks[mb],)
            if s.stage_rank[prev] == self.rank:
                return outputs.pop((prev, mb))
            return tuple(recvs.pop(("RECV_F", v, mb))[0])

        def out_grads(v, mb):
            _, nxt = s.neighbours(v, mb)
            if nxt is None:
                return None
            if s.stage_rank[nxt] == self.rank:
                return input_grads.pop((nxt, mb))
            return tuple(recvs.pop(("RECV_B", v, mb))[0])

        def forward_gen(a):
            chunk = chunks[(a.stage, a.mb)] = StageChunk()
            runner = self.runners[a.stage]
            self._aux_mbs.setdefault(runner.stage.index, []).append(a.mb)
            if s.is_last(a.stage, a.mb):
                self._loss_mbs.append(a.mb)
            target = tgts[a.mb] if s.is_last(a.stage, a.mb) else None
            yield from runner.forward(fwd_inputs(a.stage, a.mb), target, chunk)
            if not s.is_last(a.stage, a.mb):
                outputs[(a.stage, a.mb)] = chunk.outputs

        def backward_gen(a, weights):
            chunk = chunks[(a.stage, a.mb)]
            result: list = []
            yield from self.runners[a.stage].backward(chunk, out_grads(a.stage, a.mb), weights, result)
            if result:
                input_grads[(a.stage, a.mb)] = result[0]
            if weights:
                chunks.pop((a.stage, a.mb), None)

        for a in ops:
            if a.kind in ("RECV_F", "RECV_B"):
                for w in recvs[(a.kind, a.stage, a.mb)][1]:
                    w.wait()
                continue
            if a.kind in ("SEND_F", "SEND_B"):
                store, kind = (outputs, 0) if a.kind == "SEND_F" else (input_grads, 1)
                tensors = store.pop((a.stage, a.mb))
                sends += [
                    dist.isend(
                        t.contiguous(), dst=self._peer(a.peer), group=self.group, tag=self._tag(kind, a.stage, a.mb, i)
                    )
                    for i, t in enumerate(tensors)
                ]
                continue
            t0 = time.perf_counter()
            if a.kind == "F":
                _run(forward_gen(a))
            elif a.kind in ("B", "BW"):
                _run(backward_gen(a, weights=a.kind == "BW"))
            elif a.kind == "W":
                StageRunner.weight(chunks.pop((a.stage, a.mb)))
            else:  # FB: the forward of one micro-batch interleaved with the full backward of another
                f, b = a.pair
                _interleave(forward_gen(f), backward_gen(b, weights=b.kind == "BW"))
            events.append((a, t0, time.perf_counter()))
        for w in sends:
            w.wait()
        if chunks or outputs or input_grads:
            raise AssertionError(f"rank {self.rank}: state left after the step: {list(chunks)[:4]}")
        return events
