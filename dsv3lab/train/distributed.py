"""Training across processes on PyTorch's own distributed engine: DeviceMesh, FSDP2 (``fully_shard``), expert
parallelism and ``torch.distributed.checkpoint`` (DeepSeek-V3 §3.2, §3.3.3, §3.4).

The same optimizer step as :mod:`dsv3lab.train.trainer`, on ``world = pp × dp × ep`` processes laid out as a
:class:`~torch.distributed.device_mesh.DeviceMesh` with the dimensions ``("pp", "ep", "dp")``:

    global batch [B, T] of step s  ─ every rank of a stage reads it, keeps rows [r·B/n, (r+1)·B/n) ─►  n = dp·ep
    forward / backward on its rows, each micro-batch's loss scaled by rows / B   (the single process: rows / B too)
    FSDP2 reduce-scatters the gradients with SUM (divide factor 1)  ─►  the gradient of the global mean loss
    global grad norm from the local shards (one all-reduce)  ─► clip ─► AdamW on the local shards
    ─► bias update from the expert counts all-reduced over the dp·ep ranks: the same bias on every rank (§2.1.2)

* **FSDP2** (``fully_shard``): every block, every MTP module's block, then the root (embedding, head, norms, MTP
  projections). Dense parameters are sharded over the ``dp·ep`` ranks (the flattened mesh ``"data"``); under expert
  parallelism the routed experts are split by EP and replicated over ``"dp"`` (outside FSDP2, their gradients
  summed over ``dp``: :func:`shard_model` says why).
  ``zero=3`` (default) frees the gathered parameters after the forward (ZeRO-3); ``zero=2`` keeps them until the
  backward (``reshard_after_forward=False``: gradients and optimizer states sharded, parameters gathered once per
  micro-batch). ``zero=1`` — the paper's choice with PP16 × EP64 — replicates parameters *and gradients* and shards
  only the optimizer states; FSDP2 always reduce-scatters gradients, so it cannot hold full gradients: ``zero=1``
  runs the ZeRO-2 layout, which holds less memory and moves the same bytes (a reduce-scatter plus the all-gather of
  the updated parameters is the all-reduce of ZeRO-1). The planner (``dsv3lab plan --zero 1``) accounts ZeRO-1
  itself.
* **Expert parallelism**: :func:`dsv3lab.parallel.expert.shard_moe_layers` over the ``"ep"`` group — each rank keeps
  ``n_routed_experts / ep`` experts and exchanges tokens with all-to-all (tested equal to one process).
* **Exactness**: in fp32 the loss trajectory equals the single-process run on the same global batches up to the
  order of floating-point sums (``tests/test_distributed_train.py`` states the measured tolerance).
* **Checkpoints** (:func:`save_sharded_checkpoint`): each rank writes its shards with ``torch.distributed.checkpoint``
  into a hidden temporary folder; after a barrier rank 0 adds ``state.json`` and publishes the folder atomically
  (:mod:`dsv3lab.files`), then moves ``latest``. A sharded checkpoint loads at any world size and layout (DCP
  reshards by global offsets), one process included.
* **Pipeline parallelism** (``pp > 1``, :class:`PipelineRunner`): one stage per rank, 1F1B from
  ``torch.distributed.pipelining``, stages replicated over their data ranks (their MoE layers expert-parallel when
  ``ep > 1``); each stage checkpoints its own tensors.

Rank 0 writes the run folder (``run.json``, metrics, checkpoints' metadata, tokenizer) and draws the progress bar;
every rank logs its own lines to stderr (``[rank r/W] ...``).

Exactness holds for pre-training, where every position has a target. SFT (masked prompts) runs too but weights each
rank's loss by its rows, as the single-process trainer weights micro-batches: the trajectory then matches one process
only when the ranks hold equal numbers of targets (not tested).

Layouts tested equal to one process: dp, dp × ep, pp × dp, pp × ep (with MTP and the auxiliary-loss-free bias).

    torchrun --nproc-per-node 4 -m dsv3lab train --preset tiny --set dp=4 --set batch_size_start=8 --out runs/dp4
    torchrun --nproc-per-node 4 -m dsv3lab train --preset tiny --set dp=2 --set ep=2 --set batch_size_start=8 ...

Every batch size of the schedule must be a multiple of dp·ep (each data rank reads the same number of rows; the
default ramp from batch_size // 5 is not, hence ``batch_size_start`` above).

Notebook: 11_scale_to_full.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from tqdm.auto import tqdm

from ..balance import max_violation_per_sequence, update_selection_bias
from ..config import ModelConfig
from ..files import atomic_folder, atomic_write_json, atomic_write_text
from ..model import DeepSeekV3
from ..model.transformer import IGNORE_INDEX, cross_entropy
from ..parallel.expert import EPExperts, shard_moe_layers
from ..parallel.launch import spawn
from ..parallel.stages import split_model, stage_layers
from .checkpoint import (
    DCP_FORMAT,
    LATEST,
    PREFIX,
    STATE_FILE,
    check_config,
    is_sharded_checkpoint,
    latest_checkpoint,
    load_sharded_checkpoint,
    sharded_state,
)
from .config import TrainConfig
from .metrics import RunMetrics, evaluate
from .schedules import batch_size_at
from .trainer import (
    RunResult,
    StepMeasures,
    TrainingDiverged,
    _check_data,
    _diverged_message,
    _micro_batches,
    begin_step,
    build_run_model,
    load_run,
    make_data,
    make_optimizer,
    metrics_row,
    open_run_dir,
    record_step,
    run_lock,
    save_tokenizer,
    schedule_at,
)
from .trainer import train as train_single


# ---------------------------------------------------------------------- the layout
@dataclass(frozen=True)
class Layout:
    """How ``world`` processes split the work: ``pp`` pipeline stages × ``dp`` data-parallel × ``ep`` expert-parallel
    ranks, and the ZeRO stage of FSDP2."""

    pp: int
    dp: int
    ep: int
    zero: int

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.ep

    @property
    def data_ranks(self) -> int:
        """Ranks of one stage that read different rows of the batch (expert-parallel ranks bring their own data)."""
        return self.dp * self.ep


def world_size_from_env() -> int:
    """The processes of this job: the initialised group's size, else torchrun's ``WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed(cfg: TrainConfig) -> bool:
    """Does ``cfg`` run on several processes (a layout > 1, or launched by torchrun / spawn with several ranks)?"""
    return cfg.dp > 1 or cfg.ep > 1 or cfg.pp > 1 or world_size_from_env() > 1


def resolve_layout(cfg: TrainConfig, world: int, model_cfg: ModelConfig | None = None) -> Layout:
    """The :class:`Layout` of ``cfg`` on ``world`` processes (``dp=0``: the processes left), checked: every error names
    the fields and what is allowed."""
    model_cfg = model_cfg or cfg.model_config()
    if cfg.dp == 0:
        if world % (cfg.ep * cfg.pp):
            raise ValueError(
                f"dp=0 takes the processes left, but the world size {world} is not divisible by ep·pp = "
                f"{cfg.ep}·{cfg.pp}; set dp, ep, pp so that dp·ep·pp = {world}"
            )
        dp = world // (cfg.ep * cfg.pp)
    else:
        dp = cfg.dp
    layout = Layout(pp=cfg.pp, dp=dp, ep=cfg.ep, zero=cfg.zero)
    if layout.world != world:
        raise ValueError(
            f"dp·ep·pp = {dp}·{cfg.ep}·{cfg.pp} = {layout.world} must equal the number of processes ({world}); "
            f"launch with torchrun --nproc-per-node {layout.world}, or change dp/ep/pp (dp=0 takes the rest)"
        )
    if cfg.pp > 1:
        try:
            stage_layers(model_cfg.n_layers, cfg.pp)
        except ValueError as err:
            raise ValueError(f"pp={cfg.pp}: {err}") from None
    if cfg.ep > 1 and model_cfg.n_routed_experts % cfg.ep:
        raise ValueError(
            f"ep={cfg.ep} must divide n_routed_experts ({model_cfg.n_routed_experts}): each rank holds "
            "n_routed_experts / ep experts"
        )
    if cfg.ep > 1 and model_cfg.n_moe_layers == 0 and model_cfg.n_mtp == 0:
        raise ValueError(f"ep={cfg.ep} needs MoE layers, and the model has none; use ep=1")
    if cfg.stage == "grpo":
        raise ValueError("stage='grpo' trains in one process (dsv3lab.train.grpo); use dp=ep=pp=1")
    n = layout.data_ranks
    for step in range(cfg.steps):
        b = batch_size_at(step, cfg.steps, cfg)
        if b % n:
            raise ValueError(
                f"step {step} has a batch of {b} sequences, not divisible by the dp·ep = {n} ranks that read it; "
                f"every batch size of the schedule must be a multiple of {n} (batch_size={cfg.batch_size}, "
                f"batch_size_start={cfg.effective_batch_size_start}, batch_ramp_frac={cfg.batch_ramp_frac}: e.g. "
                f"batch_size_start=batch_size or batch_ramp_frac=0)"
            )
        if cfg.pp > 1 and (b // n) % cfg.micro_batch_size:
            raise ValueError(
                f"pp={cfg.pp}: step {step} gives each of the {n} data ranks {b // n} sequences, not a multiple of "
                f"micro_batch_size={cfg.micro_batch_size} (the pipeline's micro-batches have one static shape)"
            )
    return layout


# ---------------------------------------------------------------------- the process group and the mesh
def rank_device(cfg: TrainConfig) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` (set by :func:`init_ranks`) on GPUs, the CPU otherwise."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass
class Ranks:
    """This process's place in the job: the mesh, its sub-meshes and groups, and its slice of every batch."""

    layout: Layout
    mesh: DeviceMesh  # ("pp", "ep", "dp"): ep outside dp, so an expert bank's global index is (ep rank, dp shard)
    data_mesh: DeviceMesh  # "data" = ep × dp flattened: the ranks of one stage that read different rows
    rank: int
    world: int

    @property
    def data_rank(self) -> int:
        return self.data_mesh.get_local_rank()

    @property
    def data_group(self):
        return self.data_mesh.get_group()

    @property
    def ep_group(self):
        return self.mesh["ep"].get_group()

    def rows(self, batch: int) -> slice:
        """This rank's rows of a global batch of ``batch`` sequences (contiguous, equal shares)."""
        n = batch // self.layout.data_ranks
        return slice(self.data_rank * n, (self.data_rank + 1) * n)

    def log(self, msg: str) -> None:
        print(f"[rank {self.rank}/{self.world}] {msg}", file=sys.stderr, flush=True)


def init_ranks(cfg: TrainConfig, model_cfg: ModelConfig) -> tuple[Ranks, bool]:
    """Join the process group (torchrun's environment, gloo on CPU / NCCL on CUDA) unless one is initialised, and build
    the mesh. Returns (ranks, whether this call initialised the group — then :func:`train_distributed` destroys it)."""
    device = torch.device(cfg.device)
    created = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise ValueError(
                f"dp={cfg.dp}, ep={cfg.ep}, pp={cfg.pp} need several processes: launch with torchrun "
                "--nproc-per-node N (or dsv3lab.parallel.spawn), or set dp=ep=pp=1"
            )
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
    world = dist.get_world_size()
    layout = resolve_layout(cfg, world, model_cfg)
    mesh = init_device_mesh(device.type, (layout.pp, layout.ep, layout.dp), mesh_dim_names=("pp", "ep", "dp"))
    data_mesh = mesh["ep", "dp"]._flatten("data")
    return Ranks(layout, mesh, data_mesh, dist.get_rank(), world), created


# ---------------------------------------------------------------------- sharding the model
def shard_model(model: DeepSeekV3, ranks: Ranks) -> DeepSeekV3:
    """Expert parallelism (``ep > 1``: routed experts split over the ``"ep"`` group), then FSDP2 on every block, every
    MTP block and the root. Gradients are reduced with SUM: each rank's loss is already scaled by its share of the
    global batch. Every rank must hold the same full model before (same seed, or the same checkpoint).

    Under EP the expert banks stay outside FSDP2 (``ignored_params``): sharded by EP only, replicated over ``dp``,
    their gradients summed over ``dp`` by :func:`reduce_expert_gradients` after the backward. (An FSDP2 unit on the
    ``dp`` mesh around the bank, inside a block sharded over ``dp·ep``, let the ranks order their reduce-scatters
    differently in the backward and deadlocked on gloo.)"""
    layout = ranks.layout
    reshard = layout.zero == 3
    ignored: set[torch.nn.Parameter] = set()
    if layout.ep > 1:
        shard_moe_layers(model, ranks.ep_group)
        ignored = {p for m in model.modules() if isinstance(m, EPExperts) for p in m.parameters()}
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        fully_shard(block, mesh=ranks.data_mesh, reshard_after_forward=reshard, ignored_params=ignored or None)
    fully_shard(model, mesh=ranks.data_mesh, reshard_after_forward=reshard, ignored_params=ignored or None)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return model


@torch.no_grad()
def reduce_expert_gradients(model: DeepSeekV3, ranks: Ranks) -> None:
    """Under EP: sum each expert bank's gradient over the ``dp`` ranks that hold the same experts (each saw other
    tokens), in one fixed order on every rank. A bank that computed nothing still joins with zeros."""
    if ranks.layout.ep == 1 or ranks.layout.dp == 1:
        return
    group = ranks.mesh["dp"].get_group()
    for m in model.modules():
        if isinstance(m, EPExperts):
            for p in m.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=group)


# ---------------------------------------------------------------------- one optimizer step
def local_values(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly DTensor) tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_grad_norm(
    params: list[torch.nn.Parameter], max_norm: float, replicas: Callable[[torch.nn.Parameter], int] | int = 1
) -> torch.Tensor:
    """The global gradient norm (before clipping) from every rank's shards, and the gradients scaled like
    ``torch.nn.utils.clip_grad_norm_``: × min(1, max_norm / (norm + 1e-6)). FSDP2 shards a gradient without
    replication (DTensors); a plain tensor is held whole by ``replicas(p)`` ranks (EP expert banks: the dp ranks;
    under PP every tensor of a stage: its data ranks, or dp for its expert banks). So Σ over ranks of (the squares of
    the DTensor shards + those of the plain tensors / their replicas) is the squared norm of the whole model's
    gradient: one all-reduce."""
    count = replicas if callable(replicas) else (lambda p: replicas)
    held = [p for p in params if p.grad is not None]
    grads = [p.grad for p in held]
    device = local_values(grads[0]).device if grads else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for p, g in zip(held, grads):
        part = local_values(g).detach().float().pow(2).sum()
        sq += part if isinstance(g, DTensor) else part / count(p)
    dist.all_reduce(sq)
    norm = sq.sqrt()
    if math.isfinite(max_norm):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            local = local_values(g)
            local.mul_(coef.to(local.dtype))
    return norm


def distributed_step(
    model: DeepSeekV3,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    cfg: TrainConfig,
    ranks: Ranks,
    *,
    mtp_lambda: float,
    gamma: float,
    step: int,
    on_diverged: Callable[[int, str, float], str],
) -> StepMeasures:
    """One optimizer step on this rank's rows of the global batch (``tokens``, ``targets`` [B, T], the whole batch):
    the single-process :func:`dsv3lab.train.trainer.optimizer_step` with each micro-batch's loss scaled by its rows
    over the *global* batch, the measures summed over the data ranks, the global gradient norm, and the bias update
    from the counts all-reduced over the data ranks (the same update on every rank)."""
    device = rank_device(cfg)
    global_bs = tokens.shape[0]
    mine = ranks.rows(global_bs)
    model.check_tokens(tokens[mine], 0, targets[mine])
    tokens, targets = tokens[mine].to(device), targets[mine].to(device)
    autocast = torch.bfloat16 if cfg.dtype == "bf16" else None
    main_moes = model.moe_layers(include_mtp=False)
    n_experts = model.cfg.n_routed_experts
    names = ["main", *(f"mtp_{k}" for k in range(1, len(model.mtp) + 1)), "aux", "total"]
    sums = {}
    correct = n_tok = seq_vio = torch.zeros((), device=device)
    for tok, tgt in _micro_batches(tokens, targets, cfg.micro_batch_size):
        share = tok.shape[0] / global_bs
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits, losses = model(tok, tgt, mtp_lambda=mtp_lambda, check=False, fused_loss=cfg.fused_loss)
        (losses["total"] * share).backward()
        with torch.no_grad():
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() * share
            mask = tgt != IGNORE_INDEX
            pred = model.last_predictions if logits is None else logits.argmax(-1)  # [b, s]; None: fused loss
            correct = correct + ((pred == tgt) & mask).sum()
            n_tok = n_tok + mask.sum()
            if main_moes:
                per_layer = [max_violation_per_sequence(m.last_indices, n_experts) for m in main_moes]
                seq_vio = seq_vio + torch.stack(per_layer).mean() * tok.shape[0]
    names = [n for n in names if n in sums]
    values = torch.stack([sums[n] for n in names] + [correct.float(), n_tok.float(), seq_vio.float()]).double()
    dist.all_reduce(values, group=ranks.data_group)  # the global batch's means and sums
    reduce_expert_gradients(model, ranks)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad = float(clip_grad_norm(params, clip, replicas=ranks.layout.dp if ranks.layout.ep > 1 else 1))
    host = values.cpu().tolist()
    losses_host = dict(zip(names, host[: len(names)]))
    n_correct, n_valid, vio = host[len(names) :]
    if not math.isfinite(losses_host["total"]):
        raise TrainingDiverged(on_diverged(step, "loss", losses_host["total"]))
    if not math.isfinite(grad):
        raise TrainingDiverged(on_diverged(step, "gradient norm", grad))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    counts = update_selection_bias(model.moe_layers(), gamma, cfg.bias_update_rule, group=ranks.data_group)
    return StepMeasures(losses_host, int(n_correct), int(n_valid), vio, grad, counts)


# ---------------------------------------------------------------------- pipeline parallelism
class StageLoss:
    """The last stage's loss of one micro-batch, as ``DeepSeekV3.forward`` computes it: main cross-entropy + λ/D ·
    Σ_k MTP cross-entropy (the balance losses reach the gradient through ``attach_aux`` in their own stages), scaled by
    the micro-batch's ``share`` of the global batch. ``log`` keeps each call's unscaled terms and its token counts."""

    def __init__(self, depth: int):
        self.depth, self.lam, self.share = depth, 0.0, 1.0
        self.log: list[dict[str, torch.Tensor]] = []

    def __call__(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        terms = {"main": cross_entropy(outputs[0], targets)}
        for k, logits in enumerate(outputs[1:], start=1):
            terms[f"mtp_{k}"] = cross_entropy(logits, targets[:, k:])
        total = terms["main"]
        if len(outputs) > 1:
            total = total + self.lam / self.depth * torch.stack(list(terms.values())[1:]).sum()
        with torch.no_grad():
            mask = targets != IGNORE_INDEX
            record = {k: v.detach().float() for k, v in terms.items()}
            record["total_no_aux"] = total.detach().float()
            record["correct"] = ((outputs[0].argmax(-1) == targets) & mask).sum().float()
            record["n_tok"] = mask.sum().float()
            self.log.append(record)
        return total * self.share


class PipelineRunner:
    """``pp > 1``: this rank's pipeline stage (:func:`dsv3lab.parallel.stages.split_model`) run by
    ``torch.distributed.pipelining`` (1F1B, or GPipe when there are fewer micro-batches than stages), replicated over
    its data ranks (gradients summed over them after the step; no FSDP: ``zero`` does not apply). With ``ep > 1`` its
    MoE layers are expert-parallel over the ``"ep"`` group; their banks' gradients are summed over ``"dp"`` only.

    Every rank holds the whole model object, but only its stage is trained, checkpointed and resumed
    (:meth:`state_hooks`); :meth:`sync` copies every stage's tensors from the ranks that train it (the selection
    biases after each step for the metrics; everything before an evaluation — a toy-scale simplification: at 671B the
    evaluation would run through the pipeline)."""

    def __init__(self, model: DeepSeekV3, cfg: TrainConfig, ranks: Ranks):
        self.model, self.cfg, self.ranks = model, cfg, ranks
        self.pp, self.pp_rank = ranks.layout.pp, ranks.mesh.get_coordinate()[0]
        self.group = ranks.mesh["pp"].get_group()
        stages = split_model(model, self.pp)
        self.stage = stages[self.pp_rank]
        owner = {}
        for s in stages:
            for t in [*s.parameters(), *s.buffers()]:
                owner.setdefault(id(t), s.index)
        named = [*model.named_parameters(), *model.named_buffers()]
        # (name, tensor, owning stage) of every tensor of the model held by one stage, in one order on every rank
        self.tensors = [(n, t, owner[id(t)]) for n, t in named if id(t) in owner]
        self.experts = {id(p) for m in self.stage.modules() if isinstance(m, EPExperts) for p in m.parameters()}
        self.loss = StageLoss(model.cfg.n_mtp)
        self.vio = torch.zeros((), dtype=torch.float64)
        self.main_moes = [m for m in self.stage.moe_layers() if not any(m is b.block.ffn for b in model.mtp)]
        for m in self.main_moes:
            m.register_forward_hook(self._count_violation)
        device = rank_device(cfg)
        # lazy: torch.distributed.pipelining (also behind dsv3lab.parallel.pipeline) takes seconds to import and pulls
        # in torch._dynamo and triton; only a pipelined run (pp > 1) needs it
        from torch.distributed.pipelining import PipelineStage

        from ..parallel.pipeline import stage_shapes

        inputs, outputs = stage_shapes(model.cfg, self.stage, cfg.micro_batch_size, cfg.seq_len)
        self.pstage = PipelineStage(self.stage, self.pp_rank, self.pp, device, inputs, outputs, group=self.group)

    def _count_violation(self, module, inputs, output) -> None:
        if module.training:  # Σ over sequences of the layer's per-sequence MaxVio (the trainer's seq_vio)
            idx = module.last_indices
            self.vio += float(max_violation_per_sequence(idx, self.model.cfg.n_routed_experts)) * idx.shape[0]

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.stage.parameters())

    def state_hooks(self, to_saved=None, from_saved=None):
        """(to_saved, from_saved) for the sharded checkpoints: the model's entries cut to this rank's stage (each
        stage's tensors written by its own ranks, read back by them), then ``to_saved`` / ``from_saved``."""
        mine = {name for name, _, owner in self.tensors if owner == self.pp_rank}

        def cut(sd):
            sd = {**sd, "model": {k: v for k, v in sd["model"].items() if k in mine}}
            return to_saved(sd) if to_saved is not None else sd

        return cut, from_saved

    @torch.no_grad()
    def sync(self, only_bias: bool = False) -> None:
        """Copy each stage's tensors (or only the selection biases) from the rank of this pipeline that trains it."""
        for name, t, owner in self.tensors:
            if only_bias and not name.endswith("gate.bias"):
                continue
            dist.broadcast(t, src=dist.get_global_rank(self.group, owner), group=self.group)

    def step(self, model, optimizer, tokens, targets, cfg, ranks, *, mtp_lambda, gamma, step, on_diverged):
        """:func:`distributed_step` through the pipeline: this rank's rows in micro-batches of ``micro_batch_size``,
        the loss on the last stage, the measures summed over all ranks, the global gradient norm, the bias update
        from counts summed over the data ranks, then the biases shared along the pipeline."""
        device = rank_device(cfg)
        global_bs = tokens.shape[0]
        rows = ranks.rows(global_bs)
        model.check_tokens(tokens[rows], 0, targets[rows])
        tokens, targets = tokens[rows].to(device), targets[rows].to(device)
        n_micro = tokens.shape[0] // cfg.micro_batch_size
        self.loss.lam, self.loss.share, self.loss.log = mtp_lambda, cfg.micro_batch_size / global_bs, []
        self.vio.zero_()
        self.stage.aux_log.clear()
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe  # lazy, as in __init__

        cls = Schedule1F1B if n_micro >= self.pp else ScheduleGPipe
        schedule = cls(self.pstage, n_micro, loss_fn=self.loss, scale_grads=False)
        autocast = cfg.dtype == "bf16"
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            schedule.step(
                *((tokens,) if self.stage.is_first else ()), **({"target": targets} if self.stage.is_last else {})
            )
        names = ["main", *(f"mtp_{k}" for k in range(1, model.cfg.n_mtp + 1)), "total_no_aux", "correct", "n_tok"]
        values = torch.zeros(len(names) + 2, dtype=torch.float64)  # on the host; to the device for the all-reduce
        for record in self.loss.log:
            for i, n in enumerate(names):
                values[i] += float(record[n]) * (1.0 if n in ("correct", "n_tok") else self.loss.share)
        values[-2] = sum(self.stage.aux_log) * self.loss.share  # this stage's balance losses
        values[-1] = self.vio
        values = values.to(device)  # NCCL reduces device tensors only
        dist.all_reduce(values)  # every stage's part of every data rank's rows
        dp_group = ranks.mesh["dp"].get_group()
        for p in self.parameters():  # one fixed order on every rank
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if id(p) in self.experts:  # an EP bank: summed over the dp ranks holding the same experts
                if ranks.layout.dp > 1:
                    dist.all_reduce(p.grad, group=dp_group)
            else:
                dist.all_reduce(p.grad, group=ranks.data_group)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        layout = ranks.layout
        grad = float(
            clip_grad_norm(
                self.parameters(), clip, replicas=lambda p: layout.dp if id(p) in self.experts else layout.data_ranks
            )
        )
        host = dict(zip([*names, "aux", "vio"], values.cpu().tolist()))
        losses = {n: host[n] for n in names[: model.cfg.n_mtp + 1]}
        losses["aux"] = host["aux"]
        losses["total"] = host["total_no_aux"] + host["aux"]
        if not math.isfinite(losses["total"]):
            raise TrainingDiverged(on_diverged(step, "loss", losses["total"]))
        if not math.isfinite(grad):
            raise TrainingDiverged(on_diverged(step, "gradient norm", grad))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        counts = update_selection_bias(self.stage.moe_layers(), gamma, cfg.bias_update_rule, group=ranks.data_group)
        parts: list[Any] = [None] * self.pp
        dist.all_gather_object(parts, (self.pp_rank, counts), group=self.group)
        counts = torch.cat([c for _, c in sorted(parts, key=lambda x: x[0]) if c.numel()])  # [L, E] model order
        self.sync(only_bias=True)
        n_main = len(model.moe_layers(include_mtp=False))
        vio = host["vio"] / max(n_main, 1)
        return StepMeasures(losses, int(host["correct"]), int(host["n_tok"]), vio, grad, counts)


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_sharded(model: DeepSeekV3, val, batch_size: int, step: int, autocast_dtype) -> tuple[list, list]:
    """:func:`dsv3lab.train.metrics.evaluate` on every rank (each evaluates every validation row; under EP the ranks
    exchange tokens, so all must run): the root's parameters gathered for the duration (the blocks gather their own in
    their forward)."""
    model.unshard()
    try:
        return evaluate(model, val, batch_size=batch_size, step=step, autocast_dtype=autocast_dtype)
    finally:
        model.reshard()


# ---------------------------------------------------------------------- sharded checkpoints
def _expert_names(model: DeepSeekV3) -> set[str]:
    """Names of the parameters held by expert-parallel banks (sharded by EP, each rank's [E/ep, ...] slots)."""
    banks = [(name, m) for name, m in model.named_modules() if isinstance(m, EPExperts)]
    return {f"{name}.{p}" for name, m in banks for p, _ in m.named_parameters()}


def _regrid(sd: dict[str, Any], names: set[str], wrap: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
    """``wrap`` applied to the tensors ``names`` of a ``{"model", "optim"}`` state dict (their optimizer states too)."""

    def each(t):
        return wrap(t) if torch.is_tensor(t) and t.dim() > 0 else t

    def param_of(key: str) -> str:  # "state.<param name>.<key>" -> "<param name>" (flattened optimizer states)
        return key[len("state.") :].rsplit(".", 1)[0] if key.startswith("state.") else ""

    out = {"model": {k: each(v) if k in names else v for k, v in sd["model"].items()}}
    if "optim" in sd:
        out["optim"] = {k: each(v) if param_of(k) in names else v for k, v in sd["optim"].items()}
    return out


def expert_state_hooks(model: DeepSeekV3, ranks: Ranks):
    """Under EP, (to_saved, from_saved) for :func:`dsv3lab.train.checkpoint.load_sharded_checkpoint`: a rank's expert
    bank [E/ep, ...] (replicated over ``dp``) is saved as its slice of the global [E, ...] stack — a DTensor on the
    (ep, dp) mesh, ``[Shard(0), Replicate()]`` — the layout of one process, so the checkpoint loads at any EP size or
    none. Without EP: (None, None)."""
    if ranks.layout.ep == 1:
        return None, None
    names = _expert_names(model)
    mesh = ranks.mesh["ep", "dp"]
    return (
        lambda sd: _regrid(sd, names, lambda t: DTensor.from_local(t, mesh, [Shard(0), Replicate()], run_check=False)),
        lambda sd: _regrid(sd, names, lambda t: t.to_local() if isinstance(t, DTensor) else t),
    )


def on_rank0(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and give its result (or its error, re-raised as the same type) to every rank, so
    that a refusal on rank 0 (a folder in use, a wrong resume) stops every rank instead of leaving them waiting."""
    out: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            out = [(True, fn())]
        except Exception as err:  # every rank raises it
            out = [(False, err)]
    dist.broadcast_object_list(out, src=0)
    ok, value = out[0]
    if not ok:
        raise value
    return value


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    model: DeepSeekV3,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 1,
    to_saved=None,
) -> Path:
    """Checkpoint ``step`` with ``torch.distributed.checkpoint`` (a collective: every rank calls it). Each rank
    writes its shards into a hidden temporary folder that rank 0 created; after a barrier rank 0 writes
    ``state.json``, publishes the folder (:func:`dsv3lab.files.atomic_folder`) and moves ``latest``; older
    checkpoints are removed after that."""
    run_dir = Path(run_dir)
    name = f"{PREFIX}{step:07d}"
    rank = dist.get_rank()
    sd = sharded_state(model, optimizer, to_saved)
    tmp_box: list[Any] = [None]
    if rank == 0:
        folder = atomic_folder(run_dir / name, overwrite=True)
        tmp_box = [str(folder.__enter__())]
    dist.broadcast_object_list(tmp_box, src=0)
    tmp = Path(tmp_box[0])
    try:
        dcp.save(sd, checkpoint_id=tmp)
        dist.barrier()
    except BaseException as err:
        if rank == 0:
            folder.__exit__(type(err), err, err.__traceback__)
        raise
    if rank == 0:
        meta = dict(state, step=step, format=DCP_FORMAT)
        try:
            atomic_write_json(tmp / STATE_FILE, meta)
        except BaseException as err:
            folder.__exit__(type(err), err, err.__traceback__)
            raise
        folder.__exit__(None, None, None)  # publish
        atomic_write_text(run_dir / LATEST, name + "\n")
        ckpts = sorted(p for p in run_dir.glob(f"{PREFIX}*") if p.is_dir() and p.name != name)
        for p in ckpts[: max(0, len(ckpts) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return run_dir / name


# ---------------------------------------------------------------------- launching from a notebook
def _launch_rank(rank: int, world: int, cfg: TrainConfig, data, resume: bool, overwrite: bool) -> list[list[float]]:
    result = train_distributed(cfg, data, resume=resume, overwrite=overwrite)
    return [m.gate.bias.tolist() for m in result.model.moe_layers() if m.gate.bias is not None]


def launch(
    cfg: TrainConfig,
    nproc: int,
    data=None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    threads: int = 1,
    timeout: float = 1800.0,
) -> RunResult:
    """``torchrun --nproc-per-node nproc -m dsv3lab train`` from Python (a notebook, a test): ``cfg`` trained on
    ``nproc`` local processes (:func:`dsv3lab.parallel.spawn`, gloo), then the run read back into this process with
    :func:`dsv3lab.train.load_run` — the model from its sharded checkpoint, the measurements rank 0 wrote — so
    ``cfg.out`` is required. Raises if the ranks end with different selection biases (they never should)."""
    if not cfg.out:
        raise ValueError("launch reads the run back from its folder: set TrainConfig.out")
    biases = spawn(_launch_rank, nproc, cfg, data, resume, overwrite, threads=threads, timeout=timeout)
    if any(b != biases[0] for b in biases):
        raise RuntimeError("the ranks ended with different selection biases")
    return load_run(cfg.out)


# ---------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, data=None, *, resume: bool = False, overwrite: bool = False, on_step=None) -> RunResult:
    """``dsv3lab.train.train``: :func:`train_distributed` when ``cfg`` asks for several processes or the job has
    them (torchrun), else the single-process :func:`dsv3lab.train.trainer.train`."""
    if is_distributed(cfg):
        return train_distributed(cfg, data, resume=resume, overwrite=overwrite, on_step=on_step)
    return train_single(cfg, data, resume=resume, overwrite=overwrite, on_step=on_step)


def train_distributed(
    cfg: TrainConfig,
    data=None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[dict, DeepSeekV3], None] | None = None,
) -> RunResult:
    """Run ``cfg`` on every process of the job (torchrun, or :func:`dsv3lab.parallel.spawn`); every rank calls it and
    gets the :class:`RunResult` (its own shard of the model; the same metrics on every rank). Rank 0 holds the run
    folder's lock and writes it."""
    model_cfg = cfg.model_config()
    ranks, created = init_ranks(cfg, model_cfg)
    try:
        if ranks.rank == 0:
            with run_lock(cfg):
                return _train(cfg, model_cfg, ranks, data, resume, overwrite, on_step)
        return _train(cfg, model_cfg, ranks, data, resume, overwrite, on_step)
    finally:
        if created:
            dist.destroy_process_group()


def _train(cfg, model_cfg, ranks: Ranks, data, resume, overwrite, on_step) -> RunResult:
    layout = ranks.layout
    out, parent = on_rank0(lambda: open_run_dir(cfg, model_cfg, resume, overwrite))
    out = Path(cfg.out) if cfg.out else None
    if data is None:
        data = make_data(cfg, model_cfg)
    _check_data(data, cfg, model_cfg)
    if ranks.rank == 0:
        save_tokenizer(out, data.tokenizer)
    # every rank builds the same full model (seed or parent), then keeps its shards
    model, _, _, _, _ = build_run_model(cfg, model_cfg, None, parent, False)
    if layout.pp > 1 and layout.ep > 1:  # the pipeline's stages hold expert-parallel MoE layers
        shard_moe_layers(model, ranks.ep_group)
    pipe = PipelineRunner(model, cfg, ranks) if layout.pp > 1 else None
    if pipe is None:
        shard_model(model, ranks)
    optimizer = make_optimizer(model if pipe is None else pipe.stage, cfg)
    step_fn = distributed_step if pipe is None else pipe.step
    start, tokens_seen, metrics = 0, 0, RunMetrics()
    hooks = expert_state_hooks(model, ranks)
    if pipe is not None:  # each pipeline rank saves and loads only its own stage's tensors
        hooks = pipe.state_hooks(*hooks)
    ckpt = latest_checkpoint(out) if (out is not None and resume) else None
    if ckpt is not None:
        if not is_sharded_checkpoint(ckpt):
            raise ValueError(
                f"{ckpt} is a single-process checkpoint; resume it with dp=ep=pp=1 in one process, or start a "
                f"new stage from it (--from {out})"
            )
        state = load_sharded_checkpoint(ckpt, model, optimizer, *hooks, strict=pipe is None)
        check_config(state, cfg.identity(), model_cfg.to_dict(), where=str(ckpt))
        start, tokens_seen = state["step"], state["data"]["tokens_seen"]
        metrics = RunMetrics.load(out)
        metrics.truncate(start)
        ranks.log(f"resumed {ckpt} (saved at layout {state.get('layout')}) at step {start}")
    if pipe is not None:
        ranks.log(f"pipeline stage {pipe.pp_rank} of {layout.pp} (blocks {list(pipe.stage.layer_ids)}); zero ignored")
    elif layout.zero == 1:
        ranks.log("zero=1: FSDP2 always shards gradients; running the ZeRO-2 layout (parameters kept after forward)")
    ranks.log(
        f"layout pp={layout.pp} dp={layout.dp} ep={layout.ep} zero={layout.zero}; mesh coordinate "
        f"{ranks.mesh.get_coordinate()}; rows {ranks.rows(cfg.batch_size).start}..{ranks.rows(cfg.batch_size).stop} "
        f"of each batch of {cfg.batch_size}; local parameters "
        f"{sum(local_values(p).numel() for p in model.parameters()):,}"
    )
    autocast = torch.bfloat16 if cfg.dtype == "bf16" else None
    moes = model.moe_layers()

    def checkpoint(steps_done: int) -> None:
        if out is None:
            return
        if ranks.rank == 0:
            metrics.save(out)
        state = {
            "train_config": cfg.identity(),
            "model_config": model_cfg.to_dict(),
            "data": {"next_step": steps_done, "tokens_seen": tokens_seen, "seed": cfg.data_seed},
            "schedules": schedule_at(min(steps_done, cfg.steps - 1), cfg),
            "layout": {"pp": layout.pp, "dp": layout.dp, "ep": layout.ep, "zero": layout.zero, "world": ranks.world},
        }
        path = save_sharded_checkpoint(out, steps_done, model, optimizer, state, cfg.keep_checkpoints, hooks[0])
        ranks.log(f"checkpoint {path.name} written")

    def diverged(step: int, what: str, value: float) -> str:
        return _diverged_message(step, what, value, out)

    bar = tqdm(
        total=cfg.steps,
        initial=start,
        disable=not cfg.progress or ranks.rank != 0,
        desc=f"train {cfg.balance} ×{ranks.world}",
        dynamic_ncols=True,
    )
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            sched, tokens, targets = begin_step(step, cfg, optimizer, data)
            measures = step_fn(
                model,
                optimizer,
                tokens,
                targets,
                cfg,
                ranks,
                mtp_lambda=sched["mtp_lambda"],
                gamma=sched["gamma"],
                step=step,
                on_diverged=diverged,
            )
            tokens_seen += int(tokens.numel())
            row = metrics_row(step, sched, measures, int(tokens.numel()), tokens_seen, time.perf_counter() - t0, model)
            record_step(metrics, row, measures, moes if cfg.log_loads else [], model_cfg.n_routed_experts)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss_main']:.3f}", vio=f"{row['maxvio_batch']:.2f}", refresh=False)
            done = step + 1
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                if pipe is None:
                    val_rows, load_rows = evaluate_sharded(model, data.val, cfg.micro_batch_size, done, autocast)
                else:  # the stages gathered on every rank, then the single-process evaluation
                    pipe.sync()
                    val_rows, load_rows = evaluate(
                        model, data.val, batch_size=cfg.micro_batch_size, step=done, autocast_dtype=autocast
                    )
                metrics.val_rows += val_rows
                metrics.load_rows += load_rows
                ranks.log(
                    f"step {done}: loss {row['loss_main']:.4f}; validation "
                    + ", ".join(f"{r['domain']} {r['loss']:.4f}" for r in val_rows)
                )
            if on_step is not None:
                on_step(row, model)
            if done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                checkpoint(done)
    except TrainingDiverged:
        if out is not None and ranks.rank == 0:
            metrics.save(out)
        raise
    finally:
        bar.close()
    model.eval()
    return RunResult(
        model,
        model_cfg,
        cfg,
        metrics.frame,
        metrics.val,
        metrics.expert_load,
        metrics.loads(),
        getattr(data, "tokenizer", None),
        out,
    )
