"""Pipeline schedules as data (DeepSeek-V3 §3.2.1, Table 2, Fig. 5): 1F1B, ZB1P, DualPipe and DualPipeV.

A schedule says, for every rank, the order in which it runs its actions. An action is one chunk of work on one
*virtual stage* for one micro-batch:

    F   forward chunk                      B   backward for the input (activation gradient)
    W   backward for the weights           BW  the full backward, B and W fused
    FB  a forward and a full backward of two micro-batches, mutually overlapped (DualPipe's F&B)
    SEND_F / RECV_F / SEND_B / RECV_B      point-to-point transfers of activations and gradients

A *virtual stage* is one copy of one slice of the model on one rank. A micro-batch travels along a *chain* of
virtual stages (forward in chain order, backward in reverse). 1F1B and ZB1P have one chain of PP stages, one per
rank. DualPipeV cuts the model into 2N stages and folds the chain into a V on N ranks (rank r holds stages r and
2N−1−r). DualPipe keeps two chains, one per direction: direction 0 enters at rank 0, direction 1 at rank PP−1, and
rank r holds model stage r of direction 0 and model stage PP−1−r of direction 1 — two copies of the parameters.

The generators follow the published rules: 1F1B's warm-up/steady/cool-down, ZB1P's delayed weight gradients (the
rule of torch's ScheduleInterleavedZeroBubble with one stage per rank), and DeepSeek's eight phases of DualPipe and
DualPipeV (``deepseek-ai/DualPipe``). :func:`check_schedule` proves a schedule valid: every micro-batch passes every
stage of its chain exactly once, every F precedes its B, every B its W, and the ranks can run their lists to the end
without a deadlock. Tests compare the generated orders with ``torch.distributed.pipelining``'s schedules.

Pure Python: nothing here touches torch. Simulator: :mod:`dsv3lab.parallel.simulator`. Notebook: 08_dualpipe.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

COMPUTE_KINDS = ("F", "B", "W", "BW", "FB")
COMM_KINDS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


class ScheduleError(ValueError):
    """A schedule that cannot run as written (the message names the rank, the action and the broken rule)."""


@dataclass(frozen=True)
class Action:
    """One entry of a rank's list. ``stage`` is a virtual stage, ``mb`` a micro-batch; an ``FB`` pair carries its
    forward and its backward in ``pair`` (and ``stage``/``mb`` of -1); a transfer names the other rank in ``peer``."""

    kind: str
    stage: int = -1
    mb: int = -1
    pair: tuple[Action, Action] | None = None
    peer: int | None = None

    def __post_init__(self):
        if self.kind not in COMPUTE_KINDS + COMM_KINDS:
            raise ValueError(f"action kind must be one of {COMPUTE_KINDS + COMM_KINDS}, got {self.kind!r}")
        if (self.kind == "FB") != (self.pair is not None):
            raise ValueError("an FB action needs pair=(forward, backward); other kinds take none")
        if self.pair is not None and (self.pair[0].kind != "F" or self.pair[1].kind not in ("B", "BW")):
            raise ValueError(f"an FB pair is (F, B or BW), got ({self.pair[0].kind}, {self.pair[1].kind})")

    def parts(self) -> tuple[Action, ...]:
        """The compute actions inside: the pair's two for FB, else the action itself."""
        return self.pair if self.pair is not None else (self,)

    def to_json(self) -> dict:
        """A JSON-ready dict (``kind``, ``stage``, ``mb``; an FB pair as ``pair``)."""
        if self.pair is not None:
            return {"kind": "FB", "pair": [p.to_json() for p in self.pair]}
        out = {"kind": self.kind, "stage": self.stage, "mb": self.mb}
        return out if self.peer is None else out | {"peer": self.peer}

    @staticmethod
    def from_json(d: dict) -> Action:
        if d["kind"] == "FB":
            f, b = (Action.from_json(p) for p in d["pair"])
            return Action("FB", pair=(f, b))
        return Action(d["kind"], d["stage"], d["mb"], peer=d.get("peer"))

    def __str__(self) -> str:
        if self.pair is not None:
            return f"({self.pair[0]};{self.pair[1]})"
        return f"{self.stage}{self.kind}{self.mb}" + (f">{self.peer}" if self.peer is not None else "")

    __repr__ = __str__


def F(stage: int, mb: int) -> Action:
    return Action("F", stage, mb)


def B(stage: int, mb: int) -> Action:
    return Action("B", stage, mb)


def W(stage: int, mb: int) -> Action:
    return Action("W", stage, mb)


def BW(stage: int, mb: int) -> Action:
    return Action("BW", stage, mb)


def FB(forward: Action, backward: Action) -> Action:
    return Action("FB", pair=(forward, backward))


@dataclass
class Schedule:
    """Per-rank action lists plus the placement they refer to.

    ``stage_rank[v]``: the rank holding virtual stage v; ``model_stage[v]``: which slice of the model v computes
    (two virtual stages with the same model stage are copies whose gradients are summed); ``chains``: the virtual
    stages a micro-batch traverses, in forward order; ``mb_chain[mb]``: the chain of micro-batch mb;
    ``pp``: the number of pipeline stages as Table 2 counts them.
    """

    name: str
    actions: list[list[Action]]
    stage_rank: list[int]
    model_stage: list[int]
    chains: list[list[int]]
    mb_chain: list[int]
    pp: int
    meta: dict = field(default_factory=dict)

    @property
    def n_ranks(self) -> int:
        return len(self.actions)

    @property
    def n_micro(self) -> int:
        return len(self.mb_chain)

    def stages_of(self, rank: int) -> list[int]:
        """The virtual stages a rank holds, in index order."""
        return [v for v, r in enumerate(self.stage_rank) if r == rank]

    def neighbours(self, stage: int, mb: int) -> tuple[int | None, int | None]:
        """The virtual stages before and after ``stage`` on micro-batch ``mb``'s chain (None at the ends)."""
        chain = self.chains[self.mb_chain[mb]]
        i = chain.index(stage)
        return (chain[i - 1] if i > 0 else None), (chain[i + 1] if i + 1 < len(chain) else None)

    def is_first(self, stage: int, mb: int) -> bool:
        return self.chains[self.mb_chain[mb]][0] == stage

    def is_last(self, stage: int, mb: int) -> bool:
        return self.chains[self.mb_chain[mb]][-1] == stage

    def compute_actions(self, rank: int) -> list[Action]:
        """The rank's list without transfers."""
        return [a for a in self.actions[rank] if a.kind in COMPUTE_KINDS]

    def table(self) -> list[list[str]]:
        """The action lists as strings (``"0F3"``, ``"(0F7;7BW3)"``), handy to print and compare."""
        return [[str(a) for a in rank] for rank in self.actions]


# ---------------------------------------------------------------------------------------------- generators
def _check_sizes(name: str, pp: int, n_micro: int) -> None:
    if not isinstance(pp, int) or pp < 1:
        raise ValueError(f"{name}: pp (pipeline stages) must be an integer >= 1, got {pp!r}")
    if not isinstance(n_micro, int) or n_micro < 1:
        raise ValueError(f"{name}: n_micro (micro-batches) must be an integer >= 1, got {n_micro!r}")


def _single_chain(name: str, actions: list[list[Action]], pp: int, n_micro: int) -> Schedule:
    return Schedule(name, actions, list(range(pp)), list(range(pp)), [list(range(pp))], [0] * n_micro, pp)


def one_f_one_b(pp: int, n_micro: int) -> Schedule:
    """1F1B (PipeDream-Flush): rank r runs min(PP−1−r, M) warm-up forwards, then alternates one forward and one full
    backward, then drains the remaining backwards. At most PP micro-batches are in flight on rank 0."""
    _check_sizes("1f1b", pp, n_micro)
    actions = []
    for r in range(pp):
        warmup = min(pp - 1 - r, n_micro)
        ops = [F(r, i) for i in range(warmup)]
        for i in range(n_micro - warmup):  # steady state: one forward, one backward
            ops += [F(r, warmup + i), BW(r, i)]
        ops += [BW(r, i) for i in range(n_micro - warmup, n_micro)]  # cool-down
        actions.append(ops)
    return _single_chain("1f1b", actions, pp, n_micro)


def zb1p(pp: int, n_micro: int) -> Schedule:
    """ZB1P (zero-bubble ZB-H1, Qi et al. 2023): 1F1B with the backward split into B (input gradient, on the critical
    path) and W (weight gradient, off it). Rank r delays its weight gradients by r backward steps — the W of the k-th
    backward runs after the (k+r)-th — so the last ranks fill their cool-down bubbles with W while every rank keeps at
    most PP micro-batches of activations (the rule of torch's ScheduleInterleavedZeroBubble at one stage per rank)."""
    _check_sizes("zb1p", pp, n_micro)
    actions = []
    for r in range(pp):
        warmup = min(pp - 1 - r, n_micro)
        ops = [F(r, i) for i in range(warmup)]
        n_b = n_w = 0
        for step in range(n_micro):  # steady (F, B) steps, then cool-down (B) steps
            if step < n_micro - warmup:
                ops.append(F(r, warmup + step))
            ops.append(B(r, n_b))
            n_b += 1
            if step >= r:  # the first r weight gradients wait
                ops.append(W(r, n_w))
                n_w += 1
        ops += [W(r, i) for i in range(n_w, n_micro)]
        actions.append(ops)
    return _single_chain("zb1p", actions, pp, n_micro)


class _RankBuilder:
    """Per-rank bookkeeping of DeepSeek's DualPipe phases: which micro-batch comes next on each virtual stage, and a
    FIFO of postponed weight gradients (DualPipe's ``WeightGradStore``)."""

    def __init__(self, first_mb: dict[int, int]):
        self.next_f = dict(first_mb)
        self.next_b = dict(first_mb)
        self.pending_w: list[Action] = []
        self.ops: list[Action] = []

    def f(self, stage: int) -> Action:
        a = F(stage, self.next_f[stage])
        self.next_f[stage] += 1
        return a

    def b(self, stage: int, zero_bubble: bool = False) -> Action:
        """The next backward of ``stage``: full (BW), or B with its W queued when ``zero_bubble``."""
        mb = self.next_b[stage]
        self.next_b[stage] += 1
        if zero_bubble:
            self.pending_w.append(W(stage, mb))
            return B(stage, mb)
        return BW(stage, mb)

    def add(self, *actions: Action) -> None:
        self.ops.extend(actions)

    def weight(self) -> None:
        """Run the oldest postponed weight gradient."""
        if not self.pending_w:
            raise AssertionError("no postponed weight gradient to run")
        self.ops.append(self.pending_w.pop(0))


def _dual_phases(rb: _RankBuilder, s0: int, s1: int, n_ranks: int, h: int, n_chunks: int, middle: bool) -> None:
    """DeepSeek's eight phases for one rank. ``s0``/``s1``: its phase-0 and phase-1 virtual stages; ``h``: the rank's
    distance from the nearer end (DualPipe) or its rank (DualPipeV); ``n_ranks``: ranks per direction-half
    (PP/2 for DualPipe, N for DualPipeV); ``n_chunks``: micro-batches per phase-0 stage; ``middle``: this rank
    meets the other direction first (its first F0/B1 of phase 4 is not overlapped, to shorten the bubble)."""
    for _ in range(2 * (n_ranks - h - 1)):  # 1: nF0
        rb.add(rb.f(s0))
    for _ in range(h + 1):  # 2: nF0F1
        rb.add(rb.f(s0), rb.f(s1))
    for _ in range(n_ranks - h - 1):  # 3: nB1W1F1, zero bubble
        rb.add(rb.b(s1, zero_bubble=True))
        rb.weight()
        rb.add(rb.f(s1))
    for i in range(n_chunks - 2 * n_ranks + h + 1):  # 4: nF0B1F1B0, the main loop of overlapped pairs
        if i == 0 and middle:
            rb.add(rb.f(s0), rb.b(s1))
        else:
            rb.add(FB(rb.f(s0), rb.b(s1)))
        rb.add(FB(rb.f(s1), rb.b(s0)))
    for _ in range(n_ranks - h - 1):  # 5: nB1F1B0
        rb.add(rb.b(s1))
        rb.add(FB(rb.f(s1), rb.b(s0)))
    zero_bubble = False
    steps = h + 1
    for i in range(steps):  # 6: nB1B0, the second half with zero bubble
        if i == steps // 2 and h % 2 == 1:
            zero_bubble = True
        rb.add(rb.b(s1, zero_bubble))
        if i == steps // 2 and h % 2 == 0:
            zero_bubble = True
        rb.add(rb.b(s0, zero_bubble))
    for _ in range(n_ranks - h - 1):  # 7: nWB0, zero bubble
        rb.weight()
        rb.add(rb.b(s0, zero_bubble=True))
    for _ in range(h + 1):  # 8: nW
        rb.weight()
    if rb.pending_w:
        raise AssertionError("postponed weight gradients left over")


def dualpipev(pp: int, n_micro: int) -> Schedule:
    """DualPipeV (Sea AI Lab's "cut-in-half" DualPipe): the model in ``pp`` stages on pp/2 ranks, rank r holding
    stages r and pp−1−r, so one V-shaped chain starts and ends on rank 0. Needs pp even and n_micro >= pp."""
    _check_sizes("dualpipev", pp, n_micro)
    if pp % 2:
        raise ValueError(f"dualpipev: pp (stages) must be even (two stages per rank), got {pp}")
    n = pp // 2
    if n_micro < pp:
        raise ValueError(f"dualpipev: n_micro must be >= pp = {pp} (2 x ranks), got {n_micro}")
    actions = []
    for r in range(n):
        s0, s1 = r, pp - 1 - r
        rb = _RankBuilder({s0: 0, s1: 0})
        _dual_phases(rb, s0, s1, n, r, n_micro, middle=(r == n - 1))
        actions.append(rb.ops)
    stage_rank = [v if v < n else pp - 1 - v for v in range(pp)]
    return Schedule("dualpipev", actions, stage_rank, list(range(pp)), [list(range(pp))], [0] * n_micro, pp)


def dualpipe(pp: int, n_micro: int) -> Schedule:
    """DualPipe (DeepSeek-V3 §3.2.1, Fig. 5): two directions of n_micro/2 micro-batches each. Direction 0 (micro-
    batches 0 … M/2−1) runs model stages 0 … PP−1 on ranks 0 … PP−1 (virtual stages 0 … PP−1); direction 1 (M/2 … M−1)
    runs them on ranks PP−1 … 0 (virtual stages PP … 2PP−1, virtual PP+s being model stage s on rank PP−1−s).
    Needs pp even, n_micro even and n_micro >= 2·pp (DeepSeek's conditions)."""
    _check_sizes("dualpipe", pp, n_micro)
    if pp % 2:
        raise ValueError(f"dualpipe: pp (ranks) must be even, got {pp}")
    if n_micro % 2 or n_micro < 2 * pp:
        raise ValueError(f"dualpipe: n_micro must be even and >= 2 * pp = {2 * pp}, got {n_micro}")
    half = n_micro // 2
    down = list(range(pp))  # direction 0: virtual stage r on rank r
    up = [pp + s for s in range(pp)]  # direction 1: virtual stage pp+s (model stage s) on rank pp-1-s
    actions = []
    for r in range(pp):
        own, other = r, pp + (pp - 1 - r)  # the direction-0 and direction-1 virtual stages on rank r
        s0, s1 = (own, other) if r < pp // 2 else (other, own)  # phase 0 = the direction that starts nearer
        rb = _RankBuilder({own: 0, other: half})
        h = min(r, pp - 1 - r)
        _dual_phases(rb, s0, s1, pp // 2, h, half, middle=(h == pp // 2 - 1))
        actions.append(rb.ops)
    stage_rank = down + [pp - 1 - s for s in range(pp)]
    model_stage = list(range(pp)) + list(range(pp))
    return Schedule("dualpipe", actions, stage_rank, model_stage, [down, up], [0] * half + [1] * half, pp)


GENERATORS = {"1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe, "dualpipev": dualpipev}


def make_schedule(name: str, pp: int, n_micro: int) -> Schedule:
    """``name`` one of :data:`SCHEDULES`; ``pp`` the pipeline stages as in Table 2 (DualPipeV runs them on pp/2
    ranks); ``n_micro`` the micro-batches of one optimizer step."""
    if name not in GENERATORS:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    return GENERATORS[name](pp, n_micro)


# ---------------------------------------------------------------------------------------------- torch's tables
_TORCH_KINDS = {"F": "F", "I": "B", "W": "W", "B": "BW"}


def from_torch_actions(table, name: str = "torch") -> Schedule:
    """A :class:`Schedule` from torch.distributed.pipelining's per-rank action lists (objects with
    ``stage_index``, ``computation_type``, ``microbatch_index`` and ``sub_actions``, as in a schedule's
    ``pipeline_order``). Empty slots (None) and non-compute entries (REDUCE_GRAD, UNSHARD, ...) are dropped;
    torch's I/B (input / full backward) become B/BW. One chain through stages 0 … S−1."""

    def convert(a) -> Action | None:
        kind = a.computation_type.value
        if kind == "OVERLAP_F_B":
            f, b = (convert(s) for s in a.sub_actions)
            return FB(f, b)
        if kind not in _TORCH_KINDS:
            return None
        return Action(_TORCH_KINDS[kind], a.stage_index, a.microbatch_index)

    ranks = [table[r] for r in range(len(table))] if isinstance(table, dict) else list(table)
    actions = [[c for c in (convert(a) for a in row if a is not None) if c is not None] for row in ranks]
    stage_rank: dict[int, int] = {}
    n_micro = 0
    for r, row in enumerate(actions):
        for a in row:
            for p in a.parts():
                stage_rank.setdefault(p.stage, r)
                n_micro = max(n_micro, p.mb + 1)
    n_stages = max(stage_rank) + 1
    placement = [stage_rank.get(v, -1) for v in range(n_stages)]
    return Schedule(name, actions, placement, list(range(n_stages)), [list(range(n_stages))], [0] * n_micro, n_stages)


# ---------------------------------------------------------------------------------------------- validity
def dependencies(schedule: Schedule, action: Action) -> list[tuple[str, int, int]]:
    """What a compute action waits for on other stages, as (kind, stage, mb) keys of :func:`completion keys`:
    F needs the previous stage's F; B/BW need the next stage's input gradient ("G", the B or BW there); W needs
    nothing beyond its own B (same rank, checked by the order)."""
    deps = []
    for p in action.parts():
        prev, nxt = schedule.neighbours(p.stage, p.mb)
        if p.kind == "F" and prev is not None:
            deps.append(("F", prev, p.mb))
        if p.kind in ("B", "BW") and nxt is not None:
            deps.append(("G", nxt, p.mb))
    return deps


def produces(action: Action) -> list[tuple[str, int, int]]:
    """The keys an action completes: ("F", v, mb) for a forward, ("G", v, mb) for an input gradient (B or BW),
    ("W", v, mb) for a weight gradient (W or BW)."""
    out = []
    for p in action.parts():
        if p.kind == "F":
            out.append(("F", p.stage, p.mb))
        if p.kind in ("B", "BW"):
            out.append(("G", p.stage, p.mb))
        if p.kind in ("W", "BW"):
            out.append(("W", p.stage, p.mb))
    return out


def execution_order(schedule: Schedule) -> list[tuple[int, int]]:
    """One order in which the ranks can run their compute lists: (rank, index) pairs, each rank in its own order,
    each action after what it depends on. Raises :class:`ScheduleError` naming the stuck actions on a deadlock."""
    lists = [schedule.compute_actions(r) for r in range(schedule.n_ranks)]
    pos = [0] * len(lists)
    done: set[tuple[str, int, int]] = set()
    order = []
    progress = True
    while progress:
        progress = False
        for r, ops in enumerate(lists):
            while pos[r] < len(ops) and all(d in done for d in dependencies(schedule, ops[pos[r]])):
                done.update(produces(ops[pos[r]]))
                order.append((r, pos[r]))
                pos[r] += 1
                progress = True
    stuck = [(r, ops[pos[r]]) for r, ops in enumerate(lists) if pos[r] < len(ops)]
    if stuck:
        detail = "; ".join(
            f"rank {r} at {a} waits for {[d for d in dependencies(schedule, a) if d not in done]}" for r, a in stuck
        )
        raise ScheduleError(f"{schedule.name}: deadlock — {detail}")
    return order


def check_schedule(schedule: Schedule) -> Schedule:
    """Raise :class:`ScheduleError` unless the schedule can run and computes every gradient exactly once.

    Checks: placement (each action on the rank holding its stage, each micro-batch on a stage of its chain);
    exactly one F per (stage, micro-batch) and either one BW or one B plus one W; on each rank F before its
    backward and B before its W; transfers (if present) paired, each send after the compute that produced its
    tensor and each receive before the compute that consumes it; and no deadlock across ranks. Returns the
    schedule, so ``check_schedule(dualpipe(8, 20))`` can be used inline.
    """
    s = schedule
    n_stages = len(s.stage_rank)
    seen: Counter = Counter()
    for r, ops in enumerate(s.actions):
        position: dict[tuple[str, int, int], int] = {}
        for i, a in enumerate(ops):
            for p in a.parts():
                if not (0 <= p.stage < n_stages):
                    raise ScheduleError(f"{s.name}: rank {r} action {p}: stage {p.stage} not in 0..{n_stages - 1}")
                if not (0 <= p.mb < s.n_micro):
                    raise ScheduleError(f"{s.name}: rank {r} action {p}: micro-batch {p.mb} not in 0..{s.n_micro - 1}")
                if s.stage_rank[p.stage] != r:
                    raise ScheduleError(
                        f"{s.name}: rank {r} action {p}: stage {p.stage} lives on rank {s.stage_rank[p.stage]}"
                    )
                if p.stage not in s.chains[s.mb_chain[p.mb]]:
                    raise ScheduleError(f"{s.name}: rank {r} action {p}: micro-batch {p.mb} never visits this stage")
                key = (p.kind, p.stage, p.mb)
                seen[key] += 1
                position.setdefault(key, i)
        for (kind, v, mb), i in position.items():
            if kind in ("B", "BW") and position.get(("F", v, mb), len(ops)) > i:
                raise ScheduleError(f"{s.name}: rank {r}: {v}{kind}{mb} before its forward {v}F{mb}")
            if kind == "W" and position.get(("B", v, mb), len(ops)) > i:
                raise ScheduleError(f"{s.name}: rank {r}: {v}W{mb} before its input gradient {v}B{mb}")
    for mb in range(s.n_micro):
        for v in s.chains[s.mb_chain[mb]]:
            f, b, w, bw = (seen[(k, v, mb)] for k in ("F", "B", "W", "BW"))
            if f != 1:
                raise ScheduleError(f"{s.name}: forward {v}F{mb} appears {f} times (must be once)")
            if not ((bw == 1 and b == w == 0) or (bw == 0 and b == w == 1)):
                raise ScheduleError(
                    f"{s.name}: stage {v} micro-batch {mb} has {bw} full backward(s), {b} B and {w} W "
                    "(must be one BW, or one B and one W)"
                )
    if any(a.kind in COMM_KINDS for ops in s.actions for a in ops):
        _check_transfers(s)
    execution_order(s)
    return s


# ---------------------------------------------------------------------------------------------- transfers
def with_comms(schedule: Schedule) -> Schedule:
    """Lower a compute-only schedule: after each F whose next stage lives on another rank, a SEND_F; after each B/BW
    whose previous stage does, a SEND_B; and on the receiving rank a RECV right before the compute that needs it
    (a runtime posts receives early and waits there). Stages on the same rank hand tensors over locally."""
    s = schedule
    out: list[list[Action]] = []
    for r, ops in enumerate(s.actions):
        lowered: list[Action] = []
        for a in ops:
            lowered += _transfers(s, a, r, "RECV") + [a] + _transfers(s, a, r, "SEND")
        out.append(lowered)
    return Schedule(s.name, out, s.stage_rank, s.model_stage, s.chains, s.mb_chain, s.pp, dict(s.meta))


def _transfers(s: Schedule, a: Action, rank: int, direction: str) -> list[Action]:
    """The receives before (``RECV``) or the sends after (``SEND``) the compute action ``a`` on ``rank``: a forward
    takes its input from the previous stage and hands its output to the next; a backward the other way round. Only
    neighbours on another rank need a transfer."""
    out = []
    for p in a.parts():
        if p.kind not in ("F", "B", "BW"):
            continue
        prev, nxt = s.neighbours(p.stage, p.mb)
        forward = p.kind == "F"
        peer = (prev if forward else nxt) if direction == "RECV" else (nxt if forward else prev)
        if peer is not None and s.stage_rank[peer] != rank:
            out.append(Action(f"{direction}_{'F' if forward else 'B'}", p.stage, p.mb, peer=s.stage_rank[peer]))
    return out


def _check_transfers(s: Schedule) -> None:
    sends, recvs = Counter(), Counter()
    for r, ops in enumerate(s.actions):
        produced: set[tuple[str, int, int]] = set()
        received: set[tuple[str, int, int]] = set()
        for a in ops:
            if a.kind in ("SEND_F", "SEND_B"):
                want = ("F" if a.kind == "SEND_F" else "G", a.stage, a.mb)
                if want not in produced:
                    raise ScheduleError(f"{s.name}: rank {r} sends {a} before computing it")
                prev, nxt = s.neighbours(a.stage, a.mb)
                target = nxt if a.kind == "SEND_F" else prev
                if target is None or s.stage_rank[target] != a.peer:
                    raise ScheduleError(f"{s.name}: rank {r} sends {a} to rank {a.peer}, which does not need it")
                sends[(a.kind[-1], a.stage, a.mb, r, a.peer)] += 1
            elif a.kind in ("RECV_F", "RECV_B"):
                received.add((a.kind, a.stage, a.mb))
                prev, nxt = s.neighbours(a.stage, a.mb)
                source = prev if a.kind == "RECV_F" else nxt
                recvs[(a.kind[-1], source, a.mb, a.peer, r)] += 1
            else:
                for p in a.parts():
                    prev, nxt = s.neighbours(p.stage, p.mb)
                    if p.kind == "F" and prev is not None and s.stage_rank[prev] != r:
                        if ("RECV_F", p.stage, p.mb) not in received:
                            raise ScheduleError(f"{s.name}: rank {r} computes {p} before receiving its input")
                    if p.kind in ("B", "BW") and nxt is not None and s.stage_rank[nxt] != r:
                        if ("RECV_B", p.stage, p.mb) not in received:
                            raise ScheduleError(f"{s.name}: rank {r} computes {p} before receiving its gradient")
                produced.update(produces(a))
    if sends != recvs:
        missing = sorted(set(sends) ^ set(recvs))[:3]
        raise ScheduleError(f"{s.name}: sends and receives do not pair up, e.g. {missing}")
