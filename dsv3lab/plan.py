"""The memory and compute planner: does a layout of GPUs fit a model, and what does training it cost?

Plain arithmetic on a :class:`ModelConfig` (no model is built), on top of :mod:`dsv3lab.accounting`:

* :func:`plan` — training. For one layout (GPUs, pipeline stages PP, expert parallelism EP, ZeRO stage, schedule,
  micro-batch, sequence) and a recipe (how weights, gradients, optimizer states and activations are stored),
  the bytes on every pipeline rank, item by item; whether the fullest rank fits the GPU and, if not, why; the step
  time and GPU-hours per trillion tokens at a stated MFU from the FLOP count (``accounting.flops_per_token``).
* :func:`plan_inference` — serving: FP8 weights per GPU under tensor-parallel attention and expert parallelism with
  redundant experts (§3.4), and the latent KV cache that fits beside them.
* :func:`paper_checks` — the paper's numbers checked: the training layout fits an 80 GB H800, 180K GPU-hours per
  trillion tokens and 2.788M in total follow from the FLOPs per token at one MFU (C14), the prefill and decode
  layouts of §3.4 fit.

**The layout (§3.2).** ``gpus = PP × DP``: every pipeline stage is replicated DP = gpus / PP times (no tensor
parallelism, as DeepSeek-V3). The routed experts of a layer are split over EP of those DP ranks (EP divides DP), so
an expert has DP / EP replicas and every other weight DP replicas. ZeRO shards over a weight's replicas: stage 1 the
optimizer states (FP32 master weights and the two AdamW moments), stage 2 also the gradients, stage 3 also the
weights. Schedules (Table 2 and the DualPipe repository): ``1f1b`` and ``zb1p`` hold one stage per rank and up to PP
micro-batches of activations on the first rank (PP − r on rank r); ``dualpipe`` holds stages r and PP − 1 − r on
rank r (2× parameters, each stage's weights on two ranks) and PP + 1 stage-activations; ``dualpipev`` splits the
model into 2·PP stages, r and 2·PP − 1 − r on rank r (1×), with 2·PP + 1 half-size stage-activations. Layers are
spread evenly over the stages; the embedding sits on the first stage, the final norm, the output head and the MTP
modules on the last (with DualPipe both on rank 0: "the shallowest and deepest layers on the same PP rank", §3.2.3),
and extra layers go to the stages in between.

**Activations** are counted tensor by tensor in :mod:`dsv3lab.activations` (its docstring states every assumption
where the paper is silent); a :class:`~dsv3lab.activations.Recipe` (``paper``, or dsv3lab's own ``fp32``, ``bf16``,
``fp8`` trainers) sets the bytes of weights, gradients, optimizer states and each kind of activation. Not counted:
communication buffers, the CUDA context and allocator fragmentation.

Paper: §3.2 (DualPipe, recomputation, shared embedding and head), §3.3 (FP8, low-precision optimizer states and
activations), §3.4 (deployment), §4.2 and Table 1 (cost). Notebook: 11_scale_to_full.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pandas as pd

from .accounting import block_params, flops_per_token, kv_cache_bytes_per_token, mtp_module_params
from .activations import (
    FP8_WEIGHT,
    PAPER_WITHOUT_RECOMPUTATION,
    Recipe,
    activation_bytes_per_token,
    block_activation_bytes,
    loss_transient_bytes,
    recipe,
)
from .config import ModelConfig

GB = 10**9
SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


# ---------------------------------------------------------------------- GPUs
@dataclass(frozen=True)
class GPU:
    """Dense tensor-core peaks (FLOP/s) and memory of a GPU."""

    name: str
    memory_bytes: int
    bf16_flops: float
    fp8_flops: float | None


# H800/H100/H200 SXM: 1,979 TFLOPS dense FP8 (reference sheet, DeepGEMM's anchor); BF16 dense is half of it.
# Memory: what nvidia-smi reports as total for the "80GB" and "141GB" boards (81,559 / 143,771 / 81,920 MiB).
MIB = 2**20
GPUS: dict[str, GPU] = {
    "H800": GPU("H800", 81559 * MIB, 989.5e12, 1979e12),
    "H100": GPU("H100", 81559 * MIB, 989.5e12, 1979e12),
    "H200": GPU("H200", 143771 * MIB, 989.5e12, 1979e12),
    "A100": GPU("A100", 81920 * MIB, 312e12, None),
}


def gpu_spec(name: str) -> GPU:
    """A GPU of :data:`GPUS` by name, also found inside a device name such as ``"NVIDIA H200"``."""
    for key, gpu in GPUS.items():
        if key.lower() in name.lower():
            return gpu
    raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")


# ---------------------------------------------------------------------- pipeline layout
def stage_contents(cfg: ModelConfig, n_stages: int) -> list[dict[str, Any]]:
    """What each pipeline stage holds: ``layers`` (block ids), ``embed``, ``head`` (final norm + output head) and
    ``mtp`` (number of MTP modules). Layers are spread evenly; the extra ones go to the stages between the first
    (embedding) and the last (head and MTP)."""
    if n_stages > cfg.n_layers:
        raise ValueError(f"{n_stages} pipeline stages for {cfg.n_layers} layers: need at most one stage per layer")
    base, extra = divmod(cfg.n_layers, n_stages)
    order = list(range(1, n_stages - 1)) + [0, n_stages - 1] if n_stages > 2 else list(range(n_stages))
    counts = [base] * n_stages
    for s in order[:extra]:
        counts[s] += 1
    stages, start = [], 0
    for s, n in enumerate(counts):
        last = s == n_stages - 1
        stages.append(
            {"layers": list(range(start, start + n)), "embed": s == 0, "head": last, "mtp": cfg.n_mtp if last else 0}
        )
        start += n
    return stages


def rank_stages(pp: int, schedule: str) -> list[list[int]]:
    """Stage indices each pipeline rank holds under ``schedule``."""
    if schedule in ("1f1b", "zb1p"):
        return [[r] for r in range(pp)]
    if schedule == "dualpipe":
        return [[r, pp - 1 - r] for r in range(pp)] if pp > 1 else [[0]]
    if schedule == "dualpipev":
        return [[r, 2 * pp - 1 - r] for r in range(pp)]
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def in_flight_stage_activations(pp: int, schedule: str, rank: int) -> int:
    """Micro-batch × stage activations a rank holds at its peak (Table 2; DualPipeV: 2·PP + 1 of its half-size
    stages). With PP = 1 a rank finishes one micro-batch before the next."""
    if pp == 1 and schedule != "dualpipev":
        return 1
    if schedule in ("1f1b", "zb1p"):
        return pp - rank
    return pp + 1 if schedule == "dualpipe" else 2 * pp + 1


def _stage_params(cfg: ModelConfig, stage: dict[str, Any]) -> dict[str, int]:
    """Parameters of a stage: ``dense`` (replicated over DP), ``expert`` (routed experts, split over EP) and
    ``embed_head`` (embedding, final norm and output head)."""
    expert = cfg.n_routed_experts * 3 * cfg.dim * cfg.moe_inter_dim
    out = {"dense": 0, "expert": 0, "embed_head": 0}
    for i in stage["layers"]:
        is_moe = i >= cfg.n_dense_layers
        out["dense"] += block_params(cfg, i) - (expert if is_moe else 0)
        out["expert"] += expert if is_moe else 0
    if stage["mtp"]:
        out["dense"] += stage["mtp"] * (mtp_module_params(cfg) - expert)
        out["expert"] += stage["mtp"] * expert
    if stage["embed"]:
        out["embed_head"] += cfg.vocab_size * cfg.dim
    if stage["head"]:
        out["embed_head"] += cfg.vocab_size * cfg.dim + cfg.dim
    return out


def _stage_activation_per_token(cfg: ModelConfig, stage: dict[str, Any], seq: int, rec: Recipe) -> dict[str, float]:
    out = {"high_precision": 0.0, "fp8_caches": 0.0}
    blocks = [block_activation_bytes(cfg, seq, i, rec) for i in stage["layers"]]
    blocks += [block_activation_bytes(cfg, seq, cfg.n_layers + k, rec) for k in range(stage["mtp"])]
    blocks += [activation_bytes_per_token(cfg, seq, "mtp", rec) for _ in range(stage["mtp"])]
    for b in blocks:
        for key in out:
            out[key] += b[key]
    return out


# ---------------------------------------------------------------------- the training plan
@dataclass(frozen=True)
class Layout:
    """A training layout. ``micro_batch`` and ``global_batch`` count sequences of ``seq`` tokens."""

    gpus: int
    pp: int = 1
    ep: int = 1
    zero: int = 1
    micro_batch: int = 1
    seq: int = 4096
    schedule: str = "dualpipe"
    global_batch: int = 15360

    @property
    def dp(self) -> int:
        return self.gpus // self.pp

    def validate(self, cfg: ModelConfig) -> None:
        for name in ("gpus", "pp", "ep", "micro_batch", "seq", "global_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"zero must be 0, 1, 2 or 3, got {self.zero!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.gpus % self.pp:
            raise ValueError(f"gpus ({self.gpus}) must be a multiple of pp ({self.pp}): gpus = pp x dp")
        if self.dp % self.ep:
            raise ValueError(
                f"ep ({self.ep}) must divide the data-parallel size dp = gpus / pp = {self.dp}: the experts of a "
                "stage are split over ep of its dp replicas"
            )
        if cfg.n_routed_experts and cfg.n_routed_experts % self.ep:
            raise ValueError(f"ep ({self.ep}) must divide n_routed_experts ({cfg.n_routed_experts})")
        if self.schedule == "dualpipe" and self.pp > 1 and self.pp % 2:
            raise ValueError(f"dualpipe needs an even number of pipeline stages, got pp={self.pp}")
        if self.seq > cfg.max_seq_len:
            raise ValueError(f"seq ({self.seq}) exceeds the model's max_seq_len ({cfg.max_seq_len})")


ITEMS = (
    "parameters",
    "gradients",
    "optimizer_master_weights",
    "optimizer_moments",
    "embedding_and_head",
    "activations",
    "fp8_activation_caches",
    "fp8_weight_copies",
    "autocast_weight_copies",
    "loss_working_set",
)


def _rank_bytes(cfg: ModelConfig, layout: Layout, rec: Recipe, stages: list[dict], rank: int) -> dict[str, float]:
    """Bytes of one pipeline rank, item by item (see :data:`ITEMS`)."""
    tokens = layout.micro_batch * layout.seq
    held = [stages[s] for s in rank_stages(layout.pp, layout.schedule)[rank]]
    params = {"dense": 0, "expert": 0, "embed_head": 0}
    for st in held:
        for k, v in _stage_params(cfg, st).items():
            params[k] += v
    replicas = {"dense": layout.dp, "expert": layout.dp // layout.ep, "embed_head": layout.dp}
    local = {"dense": params["dense"], "expert": params["expert"] / layout.ep, "embed_head": params["embed_head"]}

    def sharded(kind: str, bytes_per: float, from_stage: int) -> float:
        return local[kind] * bytes_per / (replicas[kind] if layout.zero >= from_stage else 1)

    out = dict.fromkeys(ITEMS, 0.0)
    for kind in ("dense", "expert"):
        out["parameters"] += sharded(kind, rec.weight, 3)
        out["gradients"] += sharded(kind, rec.grad, 2)
        out["optimizer_master_weights"] += sharded(kind, rec.master, 1)
        out["optimizer_moments"] += sharded(kind, 2 * rec.moment, 1)
    out["embedding_and_head"] = sum(
        sharded("embed_head", b, z) for b, z in ((rec.weight, 3), (rec.grad, 2), (rec.master, 1), (2 * rec.moment, 1))
    )
    # the projection weights (not the embedding, norms or router) are what FP8 copies; autocast copies the head and,
    # unless they run in FP8, the projections
    head = cfg.vocab_size * cfg.dim if any(st["head"] for st in held) else 0
    projections = local["dense"] + local["expert"] - _norm_and_router_params(cfg, held)
    out["fp8_weight_copies"] = projections * rec.fp8_weight
    out["autocast_weight_copies"] = (head + (0 if rec.fp8_weight else projections)) * rec.weight_cast
    # activations: micro-batches in flight × the mean stage activation of this rank's stages
    n_flight = in_flight_stage_activations(layout.pp, layout.schedule, rank)
    per_stage = [_stage_activation_per_token(cfg, st, layout.seq, rec) for st in held]
    for key, item in (("high_precision", "activations"), ("fp8_caches", "fp8_activation_caches")):
        out[item] = n_flight * tokens * sum(p[key] for p in per_stage) / len(per_stage)
    if any(st["head"] for st in held):  # one micro-batch at the output head: its losses and their backward
        head_tok = sum(activation_bytes_per_token(cfg, layout.seq, "head", rec).values())
        out["loss_working_set"] = (1 + cfg.n_mtp) * tokens * head_tok + loss_transient_bytes(
            cfg, layout.micro_batch, layout.seq
        )
    return out


def _norm_and_router_params(cfg: ModelConfig, held: list[dict]) -> int:
    n = 0
    per_block = 2 * cfg.dim + cfg.kv_lora_rank + (cfg.q_lora_rank or 0)
    for st in held:
        for i in st["layers"]:
            n += per_block + (cfg.n_routed_experts * cfg.dim if i >= cfg.n_dense_layers else 0)
        n += st["mtp"] * (per_block + 3 * cfg.dim + cfg.n_routed_experts * cfg.dim)
    return n


def plan(
    cfg: ModelConfig,
    layout: Layout,
    gpu: str | GPU = "H800",
    gpu_mem: int | None = None,
    rec: str | Recipe = "paper",
    mfu: float | None = None,
    peak: str = "bf16",
) -> dict[str, Any]:
    """Plan training ``cfg`` on ``layout``: per-GPU bytes of the fullest pipeline rank, whether it fits
    ``gpu_mem`` (default: the GPU's memory), why not, and the step time and GPU-hours per trillion tokens at ``mfu``
    (default: the MFU the paper's 180K H800 GPU-hours per trillion tokens imply, :func:`implied_mfu`).

    Returns a JSON-ready dict: ``fits``, ``per_gpu_bytes`` (one entry per :data:`ITEMS` and ``total``), ``ranks``
    (the same per pipeline rank), ``memo`` (what DualPipe's second copy, recomputation and FP8 caching cost or save),
    ``step_s``, ``mfu``, ``gpu_hours_per_trillion_tokens``, ``explanation`` and the layout.
    """
    layout.validate(cfg)
    rec = recipe(rec)
    gpu = gpu_spec(gpu) if isinstance(gpu, str) else gpu
    mem = gpu.memory_bytes if gpu_mem is None else gpu_mem
    n_stages = 2 * layout.pp if layout.schedule == "dualpipev" else layout.pp
    stages = stage_contents(cfg, n_stages)
    ranks = []
    for r in range(layout.pp):
        b = _rank_bytes(cfg, layout, rec, stages, r)
        ranks.append(dict(b, total=sum(b.values()), rank=r, stages=rank_stages(layout.pp, layout.schedule)[r]))
    worst = max(ranks, key=lambda x: x["total"])
    per_gpu = {k: float(worst[k]) for k in (*ITEMS, "total")}
    fits = per_gpu["total"] <= mem

    flops = flops_per_token(cfg, layout.seq, mtp=True)
    peak_flops = _peak(gpu, peak)
    mfu_source = "given"
    if mfu is None:
        mfu, mfu_source = implied_mfu(peak=peak), "implied by the paper: 180K H800 GPU-hours per 10^12 tokens (671B)"
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    tokens_per_step = layout.global_batch * layout.seq
    step_s = tokens_per_step * flops / (layout.gpus * peak_flops * mfu)
    n_micro = layout.global_batch / (layout.dp * layout.micro_batch)
    result = {
        "preset": cfg.name,
        "recipe": rec.name,
        "layout": dict(dataclasses.asdict(layout), dp=layout.dp, experts_per_gpu=cfg.n_routed_experts // layout.ep),
        "gpu": gpu.name,
        "gpu_mem_bytes": mem,
        "fits": bool(fits),
        "headroom_bytes": float(mem - per_gpu["total"]),
        "per_gpu_bytes": per_gpu,
        "fullest_rank": worst["rank"],
        "ranks": ranks,
        "stages": stages,
        "memo": _memo(cfg, layout, rec, stages, worst["rank"]),
        "micro_batches_per_step": n_micro,
        "flops_per_token": flops,
        "mfu": mfu,
        "mfu_source": mfu_source,
        "peak_flops": peak_flops,
        "step_s": step_s,
        "tokens_per_step": tokens_per_step,
        "gpu_hours_per_trillion_tokens": 1e12 * flops / (peak_flops * mfu) / 3600,
    }
    result["explanation"] = _explain(result, layout, cfg)
    return result


def _peak(gpu: GPU, peak: str) -> float:
    if peak == "bf16":
        return gpu.bf16_flops
    if peak == "fp8":
        if gpu.fp8_flops is None:
            raise ValueError(f"{gpu.name} has no FP8 tensor cores; use peak='bf16'")
        return gpu.fp8_flops
    raise ValueError(f"peak must be 'bf16' or 'fp8', got {peak!r}")


def _memo(cfg: ModelConfig, layout: Layout, rec: Recipe, stages: list[dict], rank: int) -> dict[str, Any]:
    """What the fullest rank would hold without DualPipe's second copy, recomputation or FP8 caching."""
    here = _rank_bytes(cfg, layout, rec, stages, rank)
    memo: dict[str, Any] = {
        "in_flight_micro_batches": in_flight_stage_activations(layout.pp, layout.schedule, rank),
        "stages_on_rank": rank_stages(layout.pp, layout.schedule)[rank],
    }
    if layout.schedule == "dualpipe" and layout.pp > 1:
        second = stages[rank_stages(layout.pp, layout.schedule)[rank][1]]
        one = Layout(**dict(dataclasses.asdict(layout), schedule="1f1b"))
        single = _rank_bytes(cfg, one, rec, [second], 0)
        memo["dualpipe_second_copy_bytes"] = sum(
            single[k] for k in ("parameters", "gradients", "optimizer_master_weights", "optimizer_moments")
        )
    if rec.name == "paper":
        act = here["activations"] + here["fp8_activation_caches"]
        no_rc = _rank_bytes(cfg, layout, PAPER_WITHOUT_RECOMPUTATION, stages, rank)
        memo["recomputation_saves_bytes"] = no_rc["activations"] + no_rc["fp8_activation_caches"] - act
        bf16 = {r: 2.0 for r in rec.fp8_roles}
        in_bf16 = _rank_bytes(cfg, layout, rec.replace(**bf16, fp8_roles=()), stages, rank)
        memo["fp8_caching_saves_bytes"] = in_bf16["activations"] - act
    return memo


def _explain(result: dict[str, Any], layout: Layout, cfg: ModelConfig) -> list[str]:
    per, mem = result["per_gpu_bytes"], result["gpu_mem_bytes"]
    lines = [
        f"rank {result['fullest_rank']} is the fullest: {per['total'] / GB:.1f} GB of {mem / GB:.1f} GB "
        f"({'fits' if result['fits'] else 'does not fit'}, headroom {result['headroom_bytes'] / GB:+.1f} GB)"
    ]
    if not result["fits"]:
        items = sorted(((v, k) for k, v in per.items() if k != "total"), reverse=True)
        lines.append("largest items: " + ", ".join(f"{k} {v / GB:.1f} GB" for v, k in items[:3] if v > 0))
        states = sum(per[k] for k in ("parameters", "gradients", "optimizer_master_weights", "optimizer_moments"))
        acts = per["activations"] + per["fp8_activation_caches"]
        if states + per["embedding_and_head"] > mem:
            lines.append(
                "weights, gradients and optimizer states alone exceed the GPU: spread them over more GPUs (raise "
                f"--pp from {layout.pp} or --ep from {layout.ep}) or shard more (ZeRO {layout.zero} -> "
                f"{min(layout.zero + 1, 3)})"
            )
        if acts > 0.3 * mem:
            lines.append(
                f"activations of {result['memo']['in_flight_micro_batches']} in-flight micro-batches of "
                f"{layout.micro_batch} x {layout.seq} tokens take {acts / GB:.1f} GB: lower --micro-batch or --seq, "
                "or recompute more"
            )
        if per["loss_working_set"] > 0.2 * mem:
            lines.append(
                f"the output head's logits for {layout.micro_batch * layout.seq} tokens x vocabulary "
                f"{cfg.vocab_size} take {per['loss_working_set'] / GB:.1f} GB: lower --micro-batch or --seq"
            )
    if layout.schedule == "dualpipe" and layout.pp > 1:
        n = result["micro_batches_per_step"]
        if n < 2 * layout.pp or n % 2:
            lines.append(
                f"DualPipe needs an even number of at least 2 x PP = {2 * layout.pp} micro-batches per step and "
                f"DP rank; this layout has {n:g} (global_batch / (dp x micro_batch))"
            )
    return lines


# ---------------------------------------------------------------------- cost
PAPER_GPU_HOURS_PER_TRILLION = 180e3  # Table 1: 2664K H800 GPU-hours for 14.8T tokens
PAPER_COST = {"pre_training": 2664e3, "context_extension": 119e3, "post_training": 5e3, "total": 2788e3}


def gpu_hours(cfg: ModelConfig, tokens: float, seq: int, mfu: float, peak_flops: float) -> float:
    """GPU-hours to train ``tokens`` tokens of sequences of ``seq`` at ``mfu`` (main model + MTP FLOPs)."""
    return tokens * flops_per_token(cfg, seq, mtp=True) / (peak_flops * mfu) / 3600


def implied_mfu(
    cfg: ModelConfig | None = None,
    gpu_hours_per_trillion: float = PAPER_GPU_HOURS_PER_TRILLION,
    seq: int = 4096,
    gpu: str = "H800",
    peak: str = "bf16",
) -> float:
    """The MFU at which ``gpu_hours_per_trillion`` GPU-hours train 10^12 tokens (FLOPs of the main model and MTP
    per token at ``seq``; MFU against the GPU's dense ``peak``)."""
    cfg = cfg or ModelConfig.preset("671B")
    return 1e12 * flops_per_token(cfg, seq, mtp=True) / (gpu_hours_per_trillion * 3600 * _peak(gpu_spec(gpu), peak))


# ---------------------------------------------------------------------- inference
def plan_inference(
    cfg: ModelConfig,
    gpus: int,
    gpu_mem: int,
    tp: int = 1,
    ep: int = 1,
    redundant_experts: int = 0,
    shared_as_routed: bool = False,
    dense_tp: int | None = None,
    mtp: bool = False,
    seq: int = 4096,
    reserve_fraction: float = 0.1,
) -> dict[str, Any]:
    """Weights per GPU when serving ``cfg`` in FP8 (§3.4): attention (and, unless ``dense_tp`` says otherwise, the
    dense MLPs) split over ``tp`` GPUs, the embedding and head split over ``tp`` in BF16, routed experts (plus
    ``redundant_experts`` replicas, plus the shared experts when ``shared_as_routed``) split over ``ep`` GPUs, router
    weights replicated. ``reserve_fraction`` of the memory is kept for activations and workspace; the rest holds the
    BF16 latent KV cache (replicated over the ``tp`` ranks that share a sequence). Returns ``fits``,
    ``per_gpu_bytes`` and the cached tokens that fit (``kv_cache_tokens``, ``kv_sequences`` of ``seq`` tokens).
    """
    dense_tp = tp if dense_tp is None else dense_tp
    for name, v in (("gpus", gpus), ("tp", tp), ("ep", ep), ("dense_tp", dense_tp)):
        if v < 1 or gpus % v:
            raise ValueError(f"{name} ({v}) must be a positive divisor of gpus ({gpus})")
    if not 0 <= reserve_fraction < 1:
        raise ValueError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}")
    blocks = cfg.n_layers + (cfg.n_mtp if mtp else 0)
    moe_blocks = blocks - cfg.n_dense_layers
    expert = 3 * cfg.dim * cfg.moe_inter_dim
    slots = cfg.n_routed_experts + redundant_experts + (cfg.n_shared_experts if shared_as_routed else 0)
    if slots % ep:
        raise ValueError(f"ep ({ep}) must divide the {slots} expert slots (routed + redundant [+ shared])")
    experts = moe_blocks * (slots // ep) * expert * FP8_WEIGHT
    attn = blocks * _mla_projection_params(cfg) * FP8_WEIGHT / tp
    dense = cfg.n_dense_layers * 3 * cfg.dim * cfg.inter_dim * FP8_WEIGHT / dense_tp
    shared = 0.0 if shared_as_routed else moe_blocks * cfg.n_shared_experts * expert * FP8_WEIGHT / tp
    router = moe_blocks * (cfg.n_routed_experts * cfg.dim * 2 + cfg.n_routed_experts * 4)
    embed_head = 2 * cfg.vocab_size * cfg.dim * 2 / tp
    extra = (cfg.n_mtp * 2 * cfg.dim * cfg.dim * FP8_WEIGHT / tp) if mtp else 0
    per_gpu = {
        "routed_experts": experts,
        "attention": attn,
        "dense_mlps": dense,
        "shared_experts": shared,
        "router": float(router),
        "embedding_and_head": embed_head,
        "mtp_eh_proj": extra,
    }
    weights = sum(per_gpu.values())
    reserve = reserve_fraction * gpu_mem
    kv_per_token = kv_cache_bytes_per_token(cfg)["latent"] * blocks / cfg.n_layers
    free = gpu_mem - weights - reserve
    kv_tokens = max(0, int(free // kv_per_token))
    per_gpu.update(activation_reserve=reserve, weights_total=weights)
    return {
        "preset": cfg.name,
        "layout": dict(
            gpus=gpus,
            tp=tp,
            dense_tp=dense_tp,
            ep=ep,
            redundant_experts=redundant_experts,
            shared_as_routed=shared_as_routed,
            experts_per_gpu=slots / ep,
            mtp=mtp,
        ),
        "gpu_mem_bytes": gpu_mem,
        "per_gpu_bytes": per_gpu,
        "fits": bool(free >= kv_per_token * seq),
        "kv_bytes_per_token": kv_per_token,
        "kv_cache_tokens": kv_tokens,
        "kv_sequences": kv_tokens // seq,
        "seq": seq,
    }


def _mla_projection_params(cfg: ModelConfig) -> int:
    """The MLA projections' weights (norms left out): split by tensor parallelism, stored in FP8."""
    h, qk = cfg.n_heads, cfg.qk_head_dim
    q = cfg.dim * cfg.q_lora_rank + cfg.q_lora_rank * h * qk if cfg.q_lora_rank else cfg.dim * h * qk
    kv = cfg.dim * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * h * (
        cfg.qk_nope_head_dim + cfg.v_head_dim
    )
    return q + kv + h * cfg.v_head_dim * cfg.dim


# ---------------------------------------------------------------------- the paper's numbers
PAPER_TRAINING = Layout(gpus=2048, pp=16, ep=64, zero=1, micro_batch=1, seq=4096, schedule="dualpipe")
PAPER_PREFILL = dict(gpus=32, tp=4, dense_tp=1, ep=32, redundant_experts=32)
# decode: 320 GPUs, one expert each; 64 of them hold the shared expert and 63 redundant routed experts
PAPER_DECODE = dict(gpus=320, tp=4, ep=320, redundant_experts=63, shared_as_routed=True)


def paper_checks(cfg: ModelConfig | None = None) -> dict[str, Any]:
    """The paper's layouts and costs, checked (C14): the training layout on 80 GB H800s, the MFU that 180K GPU-hours
    per trillion tokens imply, the GPU-hours of Table 1 at that MFU, and the §3.4 prefill and decode layouts."""
    cfg = cfg or ModelConfig.preset("671B")
    h800 = GPUS["H800"]
    train = plan(cfg, PAPER_TRAINING, gpu=h800, rec="paper")
    mfu = implied_mfu(cfg)
    pre = gpu_hours(cfg, 14.8e12, 4096, mfu, h800.bf16_flops)
    ext_tokens = {32768: 1000 * 1920 * 32768, 131072: 1000 * 480 * 131072}  # two phases of 1000 steps (§4.3)
    ext = sum(gpu_hours(cfg, n, s, mfu, h800.bf16_flops) for s, n in ext_tokens.items())
    ext_flops = sum(n * flops_per_token(cfg, s, mtp=True) for s, n in ext_tokens.items())
    return {
        "training": {k: train[k] for k in ("fits", "per_gpu_bytes", "headroom_bytes", "fullest_rank", "memo")},
        "training_layout": train["layout"],
        "flops_per_token_4k": flops_per_token(cfg, 4096, mtp=True),
        "implied_mfu_bf16": mfu,
        "implied_mfu_fp8": implied_mfu(cfg, peak="fp8"),
        "pre_training_gpu_hours": pre,
        "context_extension_gpu_hours_at_that_mfu": ext,
        "context_extension_implied_mfu": ext_flops / (PAPER_COST["context_extension"] * 3600 * h800.bf16_flops),
        "total_gpu_hours_at_that_mfu": pre + ext + PAPER_COST["post_training"],
        "paper_gpu_hours": PAPER_COST,
        "days_per_trillion_on_2048": PAPER_GPU_HOURS_PER_TRILLION / 2048 / 24,
        "cost_usd_at_2_per_hour": PAPER_COST["total"] * 2,
        "prefill": plan_inference(cfg, gpu_mem=h800.memory_bytes, **PAPER_PREFILL),
        "decode": plan_inference(cfg, gpu_mem=h800.memory_bytes, **PAPER_DECODE),
    }


# ---------------------------------------------------------------------- tables (notebooks, plots)
def plan_table(plans: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per labelled plan (:func:`plan` results): the per-GPU items in GB, ``total_gb``, ``gpu_mem_gb``,
    ``fits``, ``step_s`` and ``gpu_hours_per_trillion_tokens``."""
    rows = []
    for label, p in plans.items():
        row = {"layout": label, **{k: p["per_gpu_bytes"][k] / GB for k in ITEMS}}
        row.update(
            total_gb=p["per_gpu_bytes"]["total"] / GB,
            gpu_mem_gb=p["gpu_mem_bytes"] / GB,
            fits=p["fits"],
            step_s=p["step_s"],
            gpu_hours_per_trillion_tokens=p["gpu_hours_per_trillion_tokens"],
        )
        rows.append(row)
    return pd.DataFrame(rows)


def rank_table(result: dict[str, Any]) -> pd.DataFrame:
    """The per-GPU items of every pipeline rank of one :func:`plan` result, in GB."""
    return pd.DataFrame(
        [
            {"rank": r["rank"], "stages": r["stages"], **{k: r[k] / GB for k in (*ITEMS, "total")}}
            for r in result["ranks"]
        ]
    )
