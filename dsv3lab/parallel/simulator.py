"""A pipeline timeline simulator, and DeepSeek-V3's Table 2 (§3.2.1) from it.

Every rank runs its action list in order; an action starts as soon as its rank is free and what it waits for on
other stages has arrived (plus a point-to-point latency when that stage lives on another rank). Durations:

    F  = f + a2a            a forward chunk: compute, plus its all-to-all (dispatch + combine) when exposed
    BW = b + a2a            a full backward chunk (the paper's B)
    B  = b − w + a2a        the input-gradient part alone;   W = w   the weight-gradient part
    FB = fb                 an overlapped F&B pair; by default max(f + b, 2·a2a) with ``overlap`` (the two chunks'
                            all-to-alls hide under each other's compute, Fig. 4) and f + b + 2·a2a without

From the timeline: the makespan, each rank's busy time and bubble (makespan − busy), the peak of activations held
per rank in micro-batch activations of one stage (+1 at a forward, −1 when the chunk's last backward part — W, or
the full backward — is done), and the parameter copies per rank (virtual stages held, each 1/PP of the model).

Table 2 in the same units (F, B, W, F&B the execution times of one chunk):

    1F1B      (PP−1)(F+B)          1×   PP
    ZB1P      (PP−1)(F+B−2W)       1×   PP
    DualPipe  (PP/2−1)(F&B+B−3W)   2×   PP+1      (DualPipeV: the same on PP/2 devices, DeepSeek's DualPipe README)

:func:`simulate` reproduces these exactly when every chunk costs the same on every stage, transfers are free
(p2p = 0) and, for the zero-bubble rows, W ≤ F = B − W and B ≤ F&B ≤ F + B (:func:`table2_assumptions` has the
exact list the tests hold). Table 2's bubble is the largest over devices: with F&B < F + B the ranks at the ends of
a DualPipe run fewer overlapped pairs, work longer and idle less. Notebook: 08_dualpipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .schedules import Action, Schedule, dependencies, execution_order, make_schedule

Number = float | int


@dataclass(frozen=True)
class Costs:
    """Chunk costs. ``f``, ``b`` (full backward), ``w`` may be one number or one per model stage; ``fb`` is the
    duration of an overlapped F&B pair (default: see the module docstring); ``p2p`` a transfer between two ranks;
    ``a2a`` the all-to-all time of one chunk, which an overlapped pair can hide (``overlap``); ``bi`` the input-
    gradient part when it is not b − w (measured runs: a split backward costs more than a fused one)."""

    f: Number | Sequence[Number] = 1
    b: Number | Sequence[Number] = 2
    w: Number | Sequence[Number] = 1
    fb: Number | None = None
    p2p: Number = 0
    a2a: Number = 0
    overlap: bool = True
    bi: Number | Sequence[Number] | None = None  # the input-gradient part B alone (default b - w)

    def __post_init__(self):
        for name in ("f", "b", "w", "bi"):
            values = getattr(self, name)
            if values is None:
                continue
            values = values if isinstance(values, Sequence) else [values]
            if any(v < 0 for v in values):
                raise ValueError(f"cost {name} must be >= 0, got {getattr(self, name)!r}")
        for s, (b, w) in enumerate(zip(self._list(self.b, 1), self._list(self.w, 1))):
            if w > b and self.bi is None:  # the input part b - w would be negative
                raise ValueError(f"cost w ({w}) must not exceed the full backward b ({b}) (stage {s})")
        for name in ("fb", "p2p", "a2a"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"cost {name} must be >= 0, got {v!r}")

    @staticmethod
    def _list(value, n: int) -> list:
        return list(value) if isinstance(value, Sequence) else [value] * n

    def per_stage(self, name: str, stage: int) -> Number:
        """Cost ``name`` (f, b or w) of model stage ``stage``. Numbers keep their type: with ``fractions.Fraction``
        costs the whole simulation is exact arithmetic."""
        value = getattr(self, name)
        if isinstance(value, Sequence):
            if stage >= len(value):
                raise ValueError(f"cost {name} has {len(value)} per-stage values, stage {stage} has none")
            return value[stage]
        return value

    def duration(self, action: Action, model_stage: Sequence[int]) -> float:
        """How long ``action`` runs (virtual stages mapped to model stages for per-stage costs)."""

        def one(p: Action) -> float:
            s = model_stage[p.stage]
            f, b, w = (self.per_stage(n, s) for n in ("f", "b", "w"))
            bi = b - w if self.bi is None else self.per_stage("bi", s)
            return {"F": f + self.a2a, "BW": b + self.a2a, "B": bi + self.a2a, "W": w}[p.kind]

        if action.kind != "FB":
            return one(action)
        if self.fb is not None:
            return self.fb
        fwd, bwd = action.pair
        compute = one(fwd) + one(bwd) - 2 * self.a2a
        return max(compute, 2 * self.a2a) if self.overlap else compute + 2 * self.a2a


@dataclass
class Timeline:
    """The simulated run: ``events`` as (rank, action, start, end); per-rank ``busy``, ``bubble`` (makespan − busy),
    ``activation_peak`` and ``param_copies``; ``makespan``."""

    schedule: Schedule
    costs: Costs
    events: list[tuple[int, Action, float, float]]
    makespan: float
    busy: list[float]
    bubble: list[float]
    activation_peak: list[int]
    param_copies: list[int]
    memory: list[list[tuple[float, int]]] = field(default_factory=list)  # per rank: (time, activations held)

    def summary(self) -> dict:
        """The keys ``dsv3lab pipeline --json`` prints: ``bubble`` (per device, as Table 2: the largest over
        devices), ``makespan``, ``activation_peak`` (max over devices), ``param_copies`` (per device), ``devices``,
        ``per_rank`` (busy, bubble, activation peak, parameter copies of every rank)."""
        return {
            "bubble": max(self.bubble),
            "makespan": self.makespan,
            "activation_peak": max(self.activation_peak),
            "param_copies": max(self.param_copies),
            "devices": self.schedule.n_ranks,
            "per_rank": [
                {"rank": r, "busy": self.busy[r], "bubble": self.bubble[r], "activation_peak": self.activation_peak[r]}
                | {"param_copies": self.param_copies[r]}
                for r in range(self.schedule.n_ranks)
            ],
        }


def simulate(schedule: Schedule, costs: Costs | None = None) -> Timeline:
    """Lay out ``schedule`` in time under ``costs`` (default F = 1, B = 2, W = 1, F&B = F + B)."""
    costs = costs or Costs()
    s = schedule
    lists = [s.compute_actions(r) for r in range(s.n_ranks)]
    ready: dict[tuple[str, int, int], tuple[float, int]] = {}  # key -> (time it is available, rank that made it)
    rank_free: list[Number] = [0] * s.n_ranks
    events: list[tuple[int, Action, float, float]] = []
    for r, i in execution_order(s):
        a = lists[r][i]
        start = rank_free[r]
        for key in dependencies(s, a):
            t, src = ready[key]
            start = max(start, t + (costs.p2p if src != r else 0))
        end = start + costs.duration(a, s.model_stage)
        rank_free[r] = end
        events.append((r, a, start, end))
        for p in a.parts():
            if p.kind == "F":
                ready[("F", p.stage, p.mb)] = (end, r)
            if p.kind in ("B", "BW"):
                ready[("G", p.stage, p.mb)] = (end, r)
    makespan = max((e for *_, e in events), default=0)
    busy: list[Number] = [0] * s.n_ranks
    for r, _, start, end in events:
        busy[r] += end - start
    memory, peaks = _activations(s, events)
    copies = [len(s.stages_of(r)) for r in range(s.n_ranks)]
    bubble = [makespan - b for b in busy]
    return Timeline(s, costs, events, makespan, busy, bubble, peaks, copies, memory)


def _activations(s: Schedule, events) -> tuple[list[list[tuple[float, int]]], list[int]]:
    held = [0] * s.n_ranks
    peaks = [0] * s.n_ranks
    memory: list[list[tuple[float, int]]] = [[(0, 0)] for _ in range(s.n_ranks)]
    for r, a, start, end in sorted(events, key=lambda e: (e[0], e[2])):
        held[r] += sum(p.kind == "F" for p in a.parts())  # a forward keeps its chunk's activations ...
        peaks[r] = max(peaks[r], held[r])
        memory[r].append((start, held[r]))
        held[r] -= sum(p.kind in ("W", "BW") for p in a.parts())  # ... until its last backward part is done
        memory[r].append((end, held[r]))
    return memory, peaks


# ---------------------------------------------------------------------------------------------- Table 2
def chunk_times(costs: Costs) -> dict[str, float]:
    """The execution times Table 2 is written in (uniform costs): F, B (full backward), W and F&B."""
    f, b, w = (costs.per_stage(n, 0) for n in ("f", "b", "w"))
    pair = Costs(f=f, b=b, w=w, fb=costs.fb, a2a=costs.a2a, overlap=costs.overlap)
    fb = pair.duration(Action("FB", pair=(Action("F", 0, 0), Action("BW", 0, 0))), [0])
    return {"F": f + costs.a2a, "B": b + costs.a2a, "W": w, "F&B": fb}


TABLE2_FORMULAS = {  # bubble, parameters per device, activations per device, devices (as printed in the paper)
    "1f1b": ("(PP-1)(F+B)", "1x", "PP", "PP"),
    "zb1p": ("(PP-1)(F+B-2W)", "1x", "PP", "PP"),
    "dualpipe": ("(PP/2-1)(F&B+B-3W)", "2x", "PP+1", "PP"),
    "dualpipev": ("(PP/2-1)(F&B+B-3W)", "2x", "PP+1", "PP/2"),
}


def table2(name: str, pp: int, costs: Costs | None = None) -> dict:
    """The paper's Table 2 row (and DualPipe README's DualPipeV row) for ``name`` at ``pp`` stages:
    ``bubble`` (per device), ``param_copies``, ``activation`` (per device), ``devices``."""
    if name in ("dualpipe", "dualpipev") and pp % 2:
        raise ValueError(f"{name}: pp (stages) must be even, got {pp}")
    t = chunk_times(costs or Costs())
    F, B, W, FB = t["F"], t["B"], t["W"], t["F&B"]
    rows = {
        "1f1b": ((pp - 1) * (F + B), 1, pp, pp),
        "zb1p": ((pp - 1) * (F + B - 2 * W), 1, pp, pp),
        "dualpipe": ((pp // 2 - 1) * (FB + B - 3 * W), 2, pp + 1, pp),
        "dualpipev": ((pp // 2 - 1) * (FB + B - 3 * W), 2, pp + 1, pp // 2),
    }
    if name not in rows:
        raise ValueError(f"schedule must be one of {', '.join(rows)}, got {name!r}")
    bubble, params, act, devices = rows[name]
    return {"bubble": bubble, "param_copies": params, "activation": act, "devices": devices}


def table2_assumptions(name: str, costs: Costs) -> list[str]:
    """The conditions under which :func:`simulate`'s bubble (the largest over devices) equals :func:`table2`'s
    exactly, found by the simulator and held by the tests over random costs; an empty list when ``costs`` meets
    them, else one string per broken condition.

    All rows: one cost per chunk kind on every stage and free transfers (p2p = 0). 1F1B: nothing more. ZB1P: the
    weight-gradient part is no longer than a forward and than the input-gradient part (W <= F, W <= B − W), so the
    postponed W's fit the holes they fill. DualPipe and DualPipeV: a forward as long as an input-gradient part
    (F = B − W, the zero-bubble papers' usual F = B_input), W <= F, and an overlapped pair no shorter than a full
    backward and no longer than the two chunks in a row (B <= F&B <= F + B). Outside these the simulated bubble
    differs from the formula (the tests show both directions).
    """
    t = chunk_times(costs)
    F, B, W, FB = t["F"], t["B"], t["W"], t["F&B"]
    broken = []
    if any(isinstance(getattr(costs, n), Sequence) and len(set(getattr(costs, n))) > 1 for n in ("f", "b", "w")):
        broken.append("the same F, B, W on every stage")
    if costs.p2p:
        broken.append("free point-to-point transfers (p2p = 0)")
    if name == "zb1p":
        if W > F:
            broken.append("W <= F")
        if W > B - W:
            broken.append("W <= B - W")
    elif name in ("dualpipe", "dualpipev"):
        if abs(F - (B - W)) > 1e-12 * max(1, abs(F)):
            broken.append("F = B - W")
        if W > F:
            broken.append("W <= F")
        if not B <= FB <= F + B:
            broken.append("B <= F&B <= F + B")
    elif name != "1f1b":
        raise ValueError(f"schedule must be one of 1f1b, zb1p, dualpipe, dualpipev, got {name!r}")
    return broken


def pipeline_report(name: str, pp: int, n_micro: int, costs: Costs | None = None) -> dict:
    """Simulate ``name`` with ``pp`` stages and ``n_micro`` micro-batches: :meth:`Timeline.summary` plus the Table 2
    row at the same costs (``table2``) and the chunk times it is written in (``chunk_times``)."""
    costs = costs or Costs()
    out = simulate(make_schedule(name, pp, n_micro), costs).summary()
    out["table2"] = table2(name, pp, costs)
    out["chunk_times"] = chunk_times(costs)
    return out


def sweep_micro_batches(names, pp: int, micro_batches, costs: Costs | None = None) -> list[dict]:
    """Rows (schedule, pp, n_micro, bubble, makespan, bubble_fraction, activation_peak) for every schedule in
    ``names`` and every micro-batch count it accepts (DualPipe needs an even count >= 2·pp, DualPipeV >= pp)."""
    rows = []
    for name in names:
        for m in micro_batches:
            try:
                schedule = make_schedule(name, pp, m)
            except ValueError:
                continue  # a count this schedule does not accept
            summary = simulate(schedule, costs).summary()
            rows.append(
                {
                    "schedule": name,
                    "pp": pp,
                    "n_micro": m,
                    "bubble": summary["bubble"],
                    "makespan": summary["makespan"],
                    "bubble_fraction": summary["bubble"] / summary["makespan"],
                    "activation_peak": summary["activation_peak"],
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------- executed runs
def measured_timeline(placement: Schedule, events_by_rank, name: str | None = None) -> Timeline:
    """The :class:`Timeline` of an executed step: ``events_by_rank[r]`` holds (action, start, end) of rank r, times
    from one common origin (a barrier). The schedule is what each rank ran, in the order it ran it, on the stages
    of ``placement``; busy time is the sum of the chunks' durations and bubble the rest of the makespan."""
    actions = [[a for a, _, _ in sorted(evs, key=lambda e: e[1])] for evs in events_by_rank]
    s = Schedule(
        name or placement.name,
        actions,
        placement.stage_rank,
        placement.model_stage,
        placement.chains,
        placement.mb_chain,
        placement.pp,
        {"measured": True},
    )
    events = [(r, a, start, end) for r, evs in enumerate(events_by_rank) for a, start, end in evs]
    makespan = max(end for *_, end in events)
    busy = [sum(end - start for rr, _, start, end in events if rr == r) for r in range(s.n_ranks)]
    memory, peaks = _activations(s, events)
    copies = [len(s.stages_of(r)) for r in range(s.n_ranks)]
    return Timeline(s, Costs(), events, makespan, busy, [makespan - b for b in busy], peaks, copies, memory)


def costs_from_timeline(timeline: Timeline) -> Costs:
    """Per-model-stage mean durations of a measured timeline's chunks as :class:`Costs`: f from the F's, b from the
    full backwards (or B + W where the backward was split), w from the W's (0 where there are none), bi from the B's,
    fb the mean overlapped pair (its two parts are not timed apart)."""
    s = timeline.schedule
    sums: dict[tuple[str, int], list[float]] = {}
    for _, a, start, end in timeline.events:
        if a.kind != "FB":
            sums.setdefault((a.kind, s.model_stage[a.stage]), []).append(end - start)

    def mean(kind, stage):
        v = sums.get((kind, stage))
        return sum(v) / len(v) if v else None

    pairs = [end - start for _, a, start, end in timeline.events if a.kind == "FB"]
    n = max(s.model_stage) + 1
    f, b, w, bi = [], [], [], []
    for st in range(n):
        fw, full, wg, inp = (mean(k, st) for k in ("F", "BW", "W", "B"))
        wg = wg if wg is not None else 0.0
        full = full if full is not None else (inp or 0.0) + wg
        f.append(fw or 0.0)
        b.append(full)
        w.append(wg)
        bi.append(inp if inp is not None else full - wg)
    return Costs(f=f, b=b, w=w, bi=bi, fb=sum(pairs) / len(pairs) if pairs else None)
