"""Pipeline parallelism executed: DeepSeek-V3 cut into stages and trained on ``torch.distributed`` (§3.2.1).

**Stages** (:mod:`dsv3lab.parallel.stages`): the embedding with the first, the head, the MTP modules and the loss with
the last; MTP's embedding travels with the hidden state; balance losses join the gradient where they are computed.

**Runtimes.** :data:`RUNTIMES` maps each schedule to its engine: ``torch.distributed.pipelining`` for 1F1B, the
interleaved zero-bubble schedule, ZBV and DualPipeV (the engine's own ``PipelineStage`` and schedule classes; a
:class:`TimedStage` records when each chunk ran), and dsv3lab's executor (:mod:`dsv3lab.parallel.executor`) for
DualPipe — two directions, rank r holding model stages r and PP−1−r — which torch does not have. The executor runs
any schedule of :mod:`dsv3lab.parallel.schedules`, and its F&B pairs go through
:func:`dsv3lab.parallel.overlap.overlapped_forward_backward`.

**After the backward**, once per optimizer step: gradients divided by the micro-batch count, summed over the ranks
holding the same stages (DualPipe's two copies) and averaged over data-parallel replicas; the selection-bias counts
summed over the same ranks (``update_selection_bias(group=...)``, each layer's counts from every copy and replica);
then AdamW. No gradient clipping (a per-rank clip would not equal the single-process one).

:func:`sequential_step` is the single-process reference on the same micro-batches; the tests hold every loss and
gradient equal to it. Notebook: 08_dualpipe.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from ..balance import update_selection_bias
from ..config import ModelConfig
from ..model import DeepSeekV3, build_model
from .executor import ScheduleExecutor
from .launch import spawn
from .schedules import Action, Schedule, dualpipe, make_schedule
from .simulator import costs_from_timeline, measured_timeline, simulate
from .stages import PipelineLoss, StageModule, split_model, stage_layers

# schedule -> (engine, placement, virtual stages per rank). Placement "loop": stage v on rank v mod R;
# "v": rank r holds stages r and 2R-1-r; "dual": rank r holds model stage r (direction 0) and PP-1-r (direction 1).
RUNTIMES = {
    "1f1b": ("torch", "loop", 1),
    "interleaved_zb": ("torch", "loop", 2),
    "zbv": ("torch", "v", 2),
    "dualpipev": ("torch", "v", 2),
    "dualpipe": ("dsv3lab", "dual", 2),
    "zb1p": ("dsv3lab", "loop", 1),
}
TORCH_CLASSES = {
    "1f1b": Schedule1F1B,
    "interleaved_zb": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}


# ---------------------------------------------------------------------------------------------- layout
@dataclass
class Layout:
    """Who holds what: ``stages[r]`` the model stages of pipeline rank r (virtual stage order for torch's
    placements); ``n_stages`` model stages; ``pp`` pipeline ranks; ``dp`` data-parallel replicas."""

    schedule: str
    pp: int
    dp: int
    n_stages: int
    stages: list[list[int]]

    def pp_rank(self, rank: int) -> int:
        return rank % self.pp

    def dp_rank(self, rank: int) -> int:
        return rank // self.pp

    def replicas(self, rank: int) -> list[int]:
        """Global ranks holding the same model stages as ``rank``: its data-parallel replicas and, for DualPipe,
        the mirror rank PP−1−r (which holds the same two stages) and its replicas."""
        same = {p for p in range(self.pp) if sorted(self.stages[p]) == sorted(self.stages[self.pp_rank(rank)])}
        return sorted(d * self.pp + p for d in range(self.dp) for p in same)


def make_layout(schedule: str, world_size: int, dp: int = 1) -> Layout:
    if schedule not in RUNTIMES:
        raise ValueError(f"schedule must be one of {', '.join(RUNTIMES)}, got {schedule!r}")
    if dp < 1 or world_size % dp:
        raise ValueError(f"dp must divide the world size {world_size}, got {dp}")
    pp = world_size // dp
    _, placement, per_rank = RUNTIMES[schedule]
    if placement == "dual" and pp % 2:
        raise ValueError(f"dualpipe needs an even number of pipeline ranks, got {pp}")
    n = pp * per_rank if placement != "dual" else pp
    if placement == "loop":
        stages = [[r + k * pp for k in range(per_rank)] for r in range(pp)]
    elif placement == "v":
        stages = [[r, n - 1 - r] for r in range(pp)]
    else:
        stages = [[r, pp - 1 - r] for r in range(pp)]
    return Layout(schedule, pp, dp, n, stages)


def groups_for(layout: Layout, rank: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(pipeline group, replica group) of ``rank``. Every rank creates every group, in the same order."""
    pp_group = replica_group = None
    for d in range(layout.dp):
        g = dist.new_group([d * layout.pp + p for p in range(layout.pp)])
        if layout.dp_rank(rank) == d:
            pp_group = g
    seen = []
    for r in range(layout.pp * layout.dp):
        members = layout.replicas(r)
        if members in seen:
            continue
        seen.append(members)
        g = dist.new_group(members)
        if rank in members:
            replica_group = g
    return pp_group, replica_group


# ---------------------------------------------------------------------------------------------- torch's engine
class TimedStage(PipelineStage):
    """torch's ``PipelineStage`` that records, for every chunk it runs, (action, start, end) in ``events`` (actions
    F, B, W, BW as in :mod:`dsv3lab.parallel.schedules`; perf_counter seconds)."""

    def __init__(self, *args, events: list, **kwargs):
        super().__init__(*args, **kwargs)
        self.events = events

    def forward_one_chunk(self, fwd_chunk_id, args, kwargs=None, save_forward_output=True):
        t0 = time.perf_counter()
        out = super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)
        self.events.append((Action("F", self.stage_index, fwd_chunk_id), t0, time.perf_counter()))
        return out

    def backward_one_chunk(self, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
        t0 = time.perf_counter()
        super().backward_one_chunk(bwd_chunk_id, loss, full_backward, last_backward)
        kind = "BW" if full_backward else "B"
        self.events.append((Action(kind, self.stage_index, bwd_chunk_id), t0, time.perf_counter()))

    def backward_weight_one_chunk(self, bwd_chunk_id, last_backward=False):
        t0 = time.perf_counter()
        super().backward_weight_one_chunk(bwd_chunk_id, last_backward)
        self.events.append((Action("W", self.stage_index, bwd_chunk_id), t0, time.perf_counter()))


def stage_shapes(cfg: ModelConfig, stage: StageModule, micro_batch: int, seq_len: int):
    """Static input and output shapes of a stage (meta tensors), so torch's stage needs no shape inference — which
    would run the stage once on an uninitialised tensor and add its routing to the MoE token counts."""
    d, v = cfg.dim, cfg.vocab_size
    # requires_grad marks the activations torch must receive as leaves with gradients
    hidden = [torch.empty(micro_batch, seq_len, d, device="meta", requires_grad=True)] * (2 if cfg.n_mtp else 1)
    inputs = (torch.empty(micro_batch, seq_len, dtype=torch.long, device="meta"),) if stage.is_first else tuple(hidden)
    if stage.is_last:
        outs = [torch.empty(micro_batch, seq_len, v, device="meta", requires_grad=True)]
        outs += [
            torch.empty(micro_batch, seq_len - k, v, device="meta", requires_grad=True) for k in range(1, cfg.n_mtp + 1)
        ]
        outputs = tuple(outs)
    else:
        outputs = tuple(hidden)
    return inputs, (outputs if len(outputs) > 1 else outputs[0])


# ---------------------------------------------------------------------------------------------- one training run
@dataclass
class PipelineSpec:
    """One pipelined training run: ``schedule`` (a key of :data:`RUNTIMES`), model ``preset`` and ``overrides``,
    ``n_micro`` micro-batches of ``micro_batch`` sequences of ``seq_len`` tokens per replica and step, ``dp``
    data-parallel replicas, AdamW ``lr``, selection-bias speed ``gamma``, ``steps`` optimizer steps."""

    schedule: str = "dualpipev"
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)
    n_micro: int = 4
    micro_batch: int = 2
    seq_len: int = 16
    steps: int = 1
    dp: int = 1
    lr: float = 1e-3
    gamma: float = 1e-3
    seed: int = 0
    overlap: bool = True
    return_grads: bool = False
    measure_p2p: bool = False
    device: str = "cpu"  # "cuda": this rank's GPU (NCCL); the same code otherwise

    def model_config(self) -> ModelConfig:
        return ModelConfig.preset(self.preset, **self.overrides)

    def check(self, world_size: int) -> Layout:
        """Raise ``ValueError`` naming the field unless this run can start on ``world_size`` processes (checked
        before any process starts); returns the layout."""
        for name in ("n_micro", "micro_batch", "seq_len", "steps", "dp"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        cfg = self.model_config()
        if self.seq_len > cfg.max_seq_len:
            raise ValueError(f"seq_len {self.seq_len} exceeds the preset's max_seq_len {cfg.max_seq_len}")
        layout = make_layout(self.schedule, world_size, self.dp)
        stage_layers(cfg.n_layers, layout.n_stages)  # every stage needs a block
        if RUNTIMES[self.schedule][0] == "dsv3lab":
            make_schedule(self.schedule, layout.n_stages, self.n_micro)  # DualPipe: even and >= 2·PP, ...
        elif self.schedule == "dualpipev" and self.n_micro < layout.n_stages:
            raise ValueError(f"dualpipev: n_micro must be >= the {layout.n_stages} stages, got {self.n_micro}")
        elif self.schedule == "interleaved_zb" and self.n_micro % max(1, self.n_micro // layout.pp):
            raise ValueError(f"interleaved_zb: n_micro must be a multiple of {max(1, self.n_micro // layout.pp)}")
        return layout


def global_batch(spec: PipelineSpec, cfg: ModelConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's tokens and targets for all replicas: [dp · n_micro · micro_batch, seq_len] each (seeded)."""
    g = torch.Generator().manual_seed(spec.seed * 1_000_003 + step)
    rows = torch.randint(0, cfg.vocab_size, (spec.dp * spec.n_micro * spec.micro_batch, spec.seq_len + 1), generator=g)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def finish_step(stages: list[StageModule], n_micro: int, dp: int, gamma: float, group) -> torch.Tensor:
    """Gradients: / n_micro, summed over ``group`` (copies and replicas), / dp. Then the bias update from the
    counts summed over ``group``. Returns the counts [layers, E]."""
    stages = sorted(stages, key=lambda s: s.index)  # the same order on every rank of the group
    for p in unique_params(stages):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad /= n_micro
        if dist.is_initialized():
            dist.all_reduce(p.grad, group=group)
        p.grad /= dp
    moes = [m for s in stages for m in s.moe_layers()]
    return update_selection_bias(moes, gamma, group=group if dist.is_initialized() else None)


def unique_params(stages: list[StageModule]) -> list[nn.Parameter]:
    seen, out = set(), []
    for s in stages:
        for p in s.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def pipeline_worker(rank: int, world_size: int, spec: PipelineSpec) -> dict:
    """Run ``spec`` as ``rank`` of ``world_size`` (``torch.distributed`` already initialised: by
    :func:`dsv3lab.parallel.spawn` or torchrun). Returns what this rank measured: per step the losses of the
    micro-batches whose loss it computed, balance-loss parts per stage, chunk events, step time, selection-bias
    counts and (``return_grads``) the gradients and the updated selection biases, by model name."""
    run = _worker_steps(rank, world_size, spec)
    while True:
        try:
            next(run)
        except StopIteration as done:
            return done.value


def _worker_steps(rank: int, world_size: int, spec: PipelineSpec):
    """:func:`pipeline_worker` as a generator that yields after every optimizer step (so that several runs can take
    turns) and returns the record."""
    cfg = spec.model_config()
    layout = spec.check(world_size)
    device = _device(spec)
    model = build_model(cfg, device=device, seed=spec.seed)  # the same weights on every rank; each keeps its stages
    model.train()
    all_stages = split_model(model, layout.n_stages)
    pp_rank, dp_rank = layout.pp_rank(rank), layout.dp_rank(rank)
    mine = [all_stages[s] for s in layout.stages[pp_rank]]
    pp_group, replica_group = groups_for(layout, rank)
    optimizer = torch.optim.AdamW(unique_params(mine), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    engine, placement, _ = RUNTIMES[spec.schedule]
    loss_fn = PipelineLoss(cfg)
    events: list = []
    if engine == "torch":
        pstages = []
        for s in mine:
            inputs, outputs = stage_shapes(cfg, s, spec.micro_batch, spec.seq_len)
            pstages.append(
                TimedStage(s, s.index, layout.n_stages, device, inputs, outputs, group=pp_group, events=events)
            )
        cls = TORCH_CLASSES[spec.schedule]
        runner = cls(pstages if len(pstages) > 1 else pstages[0], spec.n_micro, loss_fn=loss_fn, scale_grads=False)
    else:
        runner = ScheduleExecutor(spec.schedule, layout, mine, pp_rank, pp_group, loss_fn, spec.n_micro, spec.overlap)
    names = {id(p): n for n, p in model.named_parameters()}
    biases = {n: b for n, b in model.named_buffers() if n.endswith("gate.bias") and _held(n, model, mine)}
    record: dict = {"rank": rank, "pp_rank": pp_rank, "stages": layout.stages[pp_rank], "steps": []}
    if spec.measure_p2p:
        shape = (spec.micro_batch, spec.seq_len, cfg.dim)
        record["p2p_seconds"] = measure_p2p(pp_group, shape, 2 if cfg.n_mtp else 1, device=device)
    for step in range(spec.steps):
        tokens, targets = (t.to(device) for t in global_batch(spec, cfg, step))
        share = slice(dp_rank * spec.n_micro * spec.micro_batch, (dp_rank + 1) * spec.n_micro * spec.micro_batch)
        tokens, targets = tokens[share], targets[share]
        for s in mine:
            s.aux_log.clear()
        loss_fn.log.clear()
        events.clear()
        dist.barrier(group=pp_group)
        t0 = time.perf_counter()
        if engine == "torch":
            first = any(s.is_first for s in mine)
            last = any(s.is_last for s in mine)
            runner.step(*((tokens,) if first else ()), **({"target": targets, "losses": []} if last else {}))
        else:
            events.extend(runner.step(tokens, targets))
        t1 = time.perf_counter()
        counts = finish_step(mine, spec.n_micro, spec.dp, spec.gamma, replica_group)
        grads = {names[id(p)]: p.grad.clone() for p in unique_params(mine)} if spec.return_grads else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record["steps"].append(
            {
                "losses": list(loss_fn.log),
                "loss_mbs": runner.loss_micro_batches() if engine != "torch" else list(range(len(loss_fn.log))),
                "aux": {s.index: list(s.aux_log) for s in mine},
                "aux_mbs": runner.aux_micro_batches() if engine != "torch" else None,
                "events": [(a, start - t0, end - t0) for a, start, end in events],
                "seconds": t1 - t0,
                "counts": counts,
                "grads": grads,
                "bias": {n: b.clone() for n, b in biases.items()} if spec.return_grads else None,
            }
        )
        yield
    return _portable(record)


def _portable(x):
    """Tensors as NumPy arrays: results cross the process boundary by value (torch would share them through file
    descriptors that close with the worker)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().copy()
    if isinstance(x, dict):
        return {k: _portable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and not isinstance(x, Action):
        return type(x)(_portable(v) for v in x)
    return x


def _device(spec: PipelineSpec) -> torch.device:
    if spec.device == "cpu":
        return torch.device("cpu")
    if spec.device != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {spec.device!r}")
    return torch.device("cuda", torch.cuda.current_device())


def pipeline_worker_many(rank: int, world_size: int, specs: list[PipelineSpec], alternate: bool = False) -> list[dict]:
    """:func:`pipeline_worker` for several runs in one set of processes (process start-up dominates small runs).
    ``alternate``: the runs take turns step by step (A, B, C, A, B, C, …), so that a load change on a shared machine
    hits all of them alike — for timing comparisons."""
    if not alternate:
        return [pipeline_worker(rank, world_size, spec) for spec in specs]
    runs = [_worker_steps(rank, world_size, spec) for spec in specs]
    results: list = [None] * len(runs)
    active = list(range(len(runs)))
    while active:
        for i in list(active):
            try:
                next(runs[i])
            except StopIteration as done:
                results[i] = done.value
                active.remove(i)
    return results


def measure_p2p(group, shape: tuple[int, ...], n_tensors: int, repeats: int = 20, device=None) -> float:
    """One-way time of sending one micro-batch's activations ``n_tensors`` × ``shape`` (fp32) between pipeline
    ranks 0 and 1 of ``group``: the median of ``repeats`` round trips, halved. Every rank of the group calls it."""
    rank = dist.get_rank(group)
    times = []
    bufs = [torch.zeros(shape, device=device) for _ in range(n_tensors)]
    peer = dist.get_global_rank(group, 1 - rank) if rank < 2 and dist.get_world_size(group) > 1 else None
    for _ in range(repeats + 1):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        if peer is not None:
            for b in bufs:
                if rank == 0:
                    dist.send(b, peer, group=group)
                else:
                    dist.recv(b, peer, group=group)
            for b in bufs:
                if rank == 0:
                    dist.recv(b, peer, group=group)
                else:
                    dist.send(b, peer, group=group)
        times.append((time.perf_counter() - t0) / 2)
    times = sorted(times[1:])  # the first round trip sets up the connection
    return times[len(times) // 2]


def placement_of(layout: Layout, n_micro: int) -> Schedule:
    """The stages-to-ranks placement of a layout as a :class:`Schedule` without actions (what a measured timeline
    needs): one chain through the stages, or DualPipe's two."""

    if RUNTIMES[layout.schedule][1] == "dual":
        s = dualpipe(layout.pp, n_micro)
        return Schedule(layout.schedule, [[] for _ in range(layout.pp)], *_placement_fields(s))
    n = layout.n_stages
    stage_rank = [next(r for r in range(layout.pp) if v in layout.stages[r]) for v in range(n)]
    return Schedule(
        layout.schedule, [[] for _ in range(layout.pp)], stage_rank, list(range(n)), [list(range(n))], [0] * n_micro, n
    )


def _placement_fields(s) -> tuple:
    return s.stage_rank, s.model_stage, s.chains, s.mb_chain, s.pp


def executed_vs_simulated(records: list[dict], spec: PipelineSpec, skip_first: bool = True) -> list[dict]:
    """Per step and rank of a measured run (``records``: :func:`pipeline_worker` results of every rank, one
    replica): measured busy and idle time against the simulator's prediction for the same schedule as executed,
    with the same measured chunk times (per model stage) and the measured point-to-point time. Returns rows
    (schedule, step, rank, source, busy_s, idle_s, makespan_s)."""

    if spec.dp != 1:
        raise ValueError("executed_vs_simulated compares one pipeline replica: run it with dp=1")
    placement = placement_of(make_layout(spec.schedule, len(records), 1), spec.n_micro)
    p2p = records[0].get("p2p_seconds", 0.0)
    rows = []
    first = 1 if skip_first and spec.steps > 1 else 0
    for step in range(first, spec.steps):
        events = [records[r]["steps"][step]["events"] for r in range(len(records))]
        measured = measured_timeline(placement, events, spec.schedule)
        costs = costs_from_timeline(measured)
        predicted = simulate(measured.schedule, dataclasses.replace(costs, p2p=p2p))
        for source, t in (("measured", measured), ("simulated", predicted)):
            for r in range(len(records)):
                rows.append(
                    {
                        "schedule": spec.schedule,
                        "step": step,
                        "rank": r,
                        "source": source,
                        "busy_s": float(t.busy[r]),
                        "idle_s": float(t.bubble[r]),
                        "makespan_s": float(t.makespan),
                    }
                )
    return rows


def _held(buffer_name: str, model: DeepSeekV3, stages: list[StageModule]) -> bool:
    module = model.get_submodule(buffer_name.rsplit(".gate.bias", 1)[0])
    return any(module is m for s in stages for m in s.moe_layers())


# ---------------------------------------------------------------------------------------------- the reference
def sequential_step(model: DeepSeekV3, tokens: torch.Tensor, targets: torch.Tensor, n_micro: int, gamma: float):
    """DeepSeek's ``ref_step``: one process, the same micro-batches in order, each loss / n_micro backpropagated,
    then the bias update. Returns (per-micro-batch loss dicts, gradients by name, counts)."""
    losses = []
    for tok, tgt in zip(tokens.chunk(n_micro), targets.chunk(n_micro)):
        _, parts = model(tok, tgt)
        (parts["total"] / n_micro).backward()
        losses.append({k: float(v.detach()) for k, v in parts.items()})
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    counts = update_selection_bias(model.moe_layers(), gamma)
    return losses, grads, counts


def reference_run(spec: PipelineSpec) -> dict:
    """:func:`sequential_step` for every step of ``spec`` (all replicas' micro-batches in one process, with the same
    AdamW), for comparison with :func:`pipeline_worker`. Returns per step the losses, gradients, counts and the
    selection biases after the update."""
    cfg = spec.model_config()
    model = build_model(cfg, seed=spec.seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    steps = []
    for step in range(spec.steps):
        tokens, targets = global_batch(spec, cfg, step)
        losses, grads, counts = sequential_step(model, tokens, targets, spec.dp * spec.n_micro, spec.gamma)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bias = {n: b.clone() for n, b in model.named_buffers() if n.endswith("gate.bias")}
        steps.append({"losses": losses, "grads": grads, "counts": counts, "bias": bias})
    return {"steps": steps, "spec": asdict(spec)}


# ---------------------------------------------------------------------------------------------- launching
def devices_for(schedule: str, pp: int) -> int:
    """Processes a schedule needs for ``pp`` stages as Table 2 counts them (DualPipeV, ZBV and the interleaved
    schedule hold two stages per process)."""
    if schedule not in RUNTIMES:
        raise ValueError(f"schedule must be one of {', '.join(RUNTIMES)}, got {schedule!r}")
    per_rank = RUNTIMES[schedule][2] if RUNTIMES[schedule][1] != "dual" else 1
    if pp % per_rank:
        raise ValueError(f"{schedule} places {per_rank} stages per process: pp must be a multiple of {per_rank}")
    return pp // per_rank


def run_pipeline(spec: PipelineSpec, world_size: int) -> list[dict] | None:
    """Run ``spec`` on ``world_size`` real processes and return every rank's record (:func:`pipeline_worker`).

    Under torchrun (``RANK``/``WORLD_SIZE`` set) this process is one rank: it joins the group (gloo, or NCCL with
    ``spec.device == "cuda"``), runs, and rank 0 returns all records (the others None). Otherwise it starts the
    processes itself with :func:`dsv3lab.parallel.spawn`."""

    spec.check(world_size)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return spawn(pipeline_worker, world_size, spec, backend="nccl" if spec.device == "cuda" else "gloo")
    if int(os.environ["WORLD_SIZE"]) != world_size:
        raise ValueError(f"{spec.schedule} needs {world_size} processes, torchrun started {os.environ['WORLD_SIZE']}")
    if spec.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if spec.device == "cuda" else "gloo")
    try:
        torch.set_num_threads(1)
        rank = dist.get_rank()
        record = pipeline_worker(rank, world_size, spec)
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(record, gathered, dst=0)
        return gathered
    finally:
        dist.destroy_process_group()


def records_to_json(spec: PipelineSpec, records: list[dict], comparison: list[dict] | None = None) -> dict:
    """A JSON-ready copy of a run: the spec and, per rank and step, losses, step time and the chunk events
    (gradients and counts left out); ``comparison``: the rows of :func:`executed_vs_simulated`, if given."""
    out = []
    for r in records:
        steps = []
        for st in r["steps"]:
            steps.append(
                {
                    "losses": st["losses"],
                    "loss_mbs": st["loss_mbs"],
                    "seconds": st["seconds"],
                    "events": [[a.to_json(), start, end] for a, start, end in st["events"]],
                }
            )
        out.append({k: r[k] for k in ("rank", "pp_rank", "stages") if k in r} | {"steps": steps})
        if "p2p_seconds" in r:
            out[-1]["p2p_seconds"] = r["p2p_seconds"]
    return {"spec": asdict(spec), "records": out} | ({"comparison": comparison} if comparison is not None else {})


def records_from_json(data: dict) -> tuple[PipelineSpec, list[dict]]:
    """The inverse of :func:`records_to_json` (events back as (Action, start, end))."""
    spec = PipelineSpec(**data["spec"])
    records = []
    for r in data["records"]:
        steps = [
            dict(st, events=[(Action.from_json(a), start, end) for a, start, end in st["events"]]) for st in r["steps"]
        ]
        records.append(dict(r, steps=steps))
    return spec, records
