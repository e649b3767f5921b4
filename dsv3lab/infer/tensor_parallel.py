"""Inference of an official-layout checkpoint across processes: attention heads and dense FFNs split by tensor
parallelism, routed experts split by expert parallelism, each rank reading only its own slices of the safetensors
files (DeepSeek-V3 §3.4; the layout of the official ``inference/model.py``).

Over a process group of W ranks, rank r holds:

* **MLA** — heads [r·h/W, (r+1)·h/W): ``wq`` (or ``wq_b``) and ``wkv_b`` column-parallel (their rows of those heads),
  ``wo`` row-parallel (its columns of those heads); each rank attends with its own heads and the partial ``wo``
  outputs are summed by one all-reduce. ``wq_a``, ``wkv_a`` and the two norms are replicated: the latent c_KV and
  the rotary key k^R are shared by all heads, so every rank computes them (and caches them: the latent KV cache is
  replicated, the per-head cache is split by heads).
* **dense MLP** (first ``n_dense_layers``) — ``w1``/``w3`` column-parallel, ``w2`` row-parallel, one all-reduce.
* **MoE** — the router is replicated, so every rank routes every token the same way; routed experts
  [r·E/W, (r+1)·E/W) live on rank r, which computes only the (token, expert) pairs routed to them; the shared experts
  are column/row-parallel; one all-reduce sums the routed and the shared partial outputs (the official combine;
  :mod:`dsv3lab.parallel.expert` is the all-to-all version for training, where ranks hold different tokens).
* **embedding, head, final norm, MTP ``eh_proj``** — replicated (not vocab-parallel: 2·V·d values, 1.9 G for V3, are
  ~0.3 % of the model and keep the logits whole on every rank).

Every rank runs the same tokens, and after each all-reduce every rank holds the same activations, so every rank
computes the same logits and picks the same next token: :func:`dsv3lab.infer.generate` runs unchanged on each rank.

:func:`load_sharded` is :func:`dsv3lab.infer.from_pretrained` for one rank: the same checks of the folder (config,
index, headers) before anything is allocated, a model built on the meta device with the local shapes, then every
tensor read as ``safe_open(...).get_slice(name)[rows]`` — the rank's rows (or columns, or the experts it holds) —
never the whole tensor of a split weight. FP8 weights bring the covering rows of their ``weight_scale_inv`` and are
dequantised (or kept in E4M3 with ``keep_fp8``, which needs the split to fall on block boundaries: true for the
671B checkpoint on 1, 2, 4 or 8 GPUs with 128×128 blocks).

    torchrun --nproc-per-node 8 -m dsv3lab generate --checkpoint DeepSeek-V3 --keep-fp8 --device cuda --prompt ...

Notebook: 10_inference.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open

from ..config import ModelConfig
from ..files import CheckpointError, names_list
from ..fp8.quant import expand_scale
from ..model import MLA, MLP, DeepSeekV3, Experts, MoE, MTPModule
from .blockfp8 import DEFAULT_BLOCK, is_fp8
from .checkpoint import (
    CONFIG_FILE,
    DTYPES,
    SCALE_SUFFIX,
    LoadStats,
    _check_duplicate,
    _fp8_store,
    _plan,
    check_headers,
    check_unquantized,
    check_values,
    fp8_block,
    read_hf_config,
    read_model_config,
    read_weight_map,
    shard_groups,
    stored_names,
)
from .fp8weights import keep_fp8_modules
from .layout import Slot, from_rotate_half, layout


# ---------------------------------------------------------------------- which sizes split over the ranks
def split_sizes(cfg: ModelConfig) -> dict[str, int]:
    """What tensor and expert parallelism divide by the world size: heads, routed experts, the dense MLP's and the
    shared experts' hidden widths (only those the model has)."""
    out = {"n_heads": cfg.n_heads}
    if cfg.n_moe_layers > 0 or cfg.n_mtp > 0:
        out["n_routed_experts"] = cfg.n_routed_experts
        if cfg.n_shared_experts:
            out["n_shared_experts * moe_inter_dim"] = cfg.n_shared_experts * cfg.moe_inter_dim
    if cfg.n_dense_layers > 0:
        out["inter_dim"] = cfg.inter_dim
    return out


def check_world(cfg: ModelConfig, world_size: int) -> None:
    """Refuse a world size that does not divide every split size, naming each and the world sizes that work."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    sizes = split_sizes(cfg)
    bad = [f"{k}={v}" for k, v in sizes.items() if v % world_size]
    if bad:
        ok = [w for w in range(1, max(sizes.values()) + 1) if all(v % w == 0 for v in sizes.values())]
        raise ValueError(
            f"cannot split {cfg.name} over {world_size} processes: {', '.join(bad)} not divisible by "
            f"{world_size} (heads are split by tensor parallelism, routed experts by expert parallelism); "
            f"allowed world sizes: {', '.join(map(str, ok))}"
        )


def _group_info(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "tensor-parallel inference needs an initialised torch.distributed process group (torchrun, or "
            "dsv3lab.parallel.spawn); with one process use from_pretrained"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_sum(x: torch.Tensor, world_size: int, group) -> torch.Tensor:
    """Sum ``x`` over the ranks of ``group`` in place (the row-parallel combine) and return it (one rank: as is)."""
    if world_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


# ---------------------------------------------------------------------- the rank-local modules
class TensorParallelMLA(MLA):
    """MLA with this rank's h/W heads (``self.cfg.n_heads`` is the local count): column-parallel ``wq``/``wq_b`` and
    ``wkv_b``, row-parallel ``wo``, then the all-reduce of the official ``RowParallelLinear``."""

    def __init__(self, cfg: ModelConfig, world_size: int, group=None):
        super().__init__(cfg.replace(n_heads=cfg.n_heads // world_size))
        self.world_size, self.group = world_size, group

    def forward(self, x, start_pos, cos, sin, cache=None):
        # x: [b, s, dim] -> this rank's heads -> partial wo output [b, s, dim] -> summed over the ranks
        return all_reduce_sum(super().forward(x, start_pos, cos, sin, cache), self.world_size, self.group)


class TensorParallelMLP(MLP):
    """The dense SwiGLU MLP with this rank's 1/W of the hidden units: ``w1``/``w3`` column-, ``w2`` row-parallel."""

    def __init__(self, dim: int, inter_dim: int, cfg: ModelConfig, world_size: int, group=None):
        super().__init__(dim, inter_dim // world_size, cfg)
        self.world_size, self.group = world_size, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(super().forward(x), self.world_size, self.group)


class ShardedMoE(MoE):
    """DeepSeekMoE on one rank: the replicated router, this rank's E/W routed experts (expert parallel) and its 1/W of
    the shared experts' hidden units (tensor parallel); one all-reduce sums both partial outputs."""

    def __init__(self, cfg: ModelConfig, rank: int, world_size: int, group=None):
        super().__init__(cfg)
        self.rank, self.world_size, self.group = rank, world_size, group
        self.n_local = cfg.n_routed_experts // world_size
        self.first = rank * self.n_local  # global index of local expert 0
        # the local bank: only the sizes Experts reads matter (each (token, expert) pair arrives alone, K = 1)
        bank = cfg.replace(n_routed_experts=self.n_local, n_activated_experts=1, n_expert_groups=1, n_limited_groups=1)
        self.experts = Experts(bank)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim // world_size, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        flat = x.reshape(b * s, d)  # [T, dim]
        weights, indices = self.route(flat, b, s)  # [T, K] global expert ids: the same on every rank
        local = (indices >= self.first) & (indices < self.first + self.n_local)
        token, slot = torch.where(local)  # the (token, choice) pairs this rank computes: [P], [P]
        y = torch.zeros_like(flat)
        if token.numel():
            pairs = self.experts(flat[token], weights[token, slot, None], indices[token, slot, None] - self.first)
            y.index_add_(0, token, pairs)  # [P, dim] summed per token
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return all_reduce_sum(y, self.world_size, self.group).view(b, s, d)


def shard_model(model: DeepSeekV3, rank: int, world_size: int, group=None) -> DeepSeekV3:
    """Replace, in place, every block's attention and FFN (main layers and MTP) by its rank-local form. Call it on a
    model built on the meta device: the new modules are created on the current default device, uninitialised."""
    cfg = model.cfg
    check_world(cfg, world_size)
    blocks = list(model.layers) + [m.block for m in model.mtp if isinstance(m, MTPModule)]
    for block in blocks:
        block.attn = TensorParallelMLA(cfg, world_size, group)
        if isinstance(block.ffn, MoE):
            block.ffn = ShardedMoE(cfg, rank, world_size, group)
        else:
            block.ffn = TensorParallelMLP(cfg.dim, cfg.inter_dim, cfg, world_size, group)
    return model


def rank_weight_bytes(
    cfg: ModelConfig,
    world_size: int,
    *,
    keep_fp8: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    block: tuple[int, int] = DEFAULT_BLOCK,
    rank: int = 0,
) -> int:
    """Bytes of one rank's weights (parameters and persistent buffers) as :func:`load_sharded` holds them, from the
    model built on the meta device (no memory): ``keep_fp8`` counts E4M3 projections with their fp32 block scales,
    otherwise every projection in ``dtype``. For the 671B model on 8 ranks: 90.0 GB kept in FP8, 175.9 GB in BF16."""
    with torch.device("meta"):
        model = shard_model(DeepSeekV3(cfg), rank, world_size)
        model.to(dtype)
        if keep_fp8:
            names = [s.name for s in layout(cfg).values() if s.fp8]
            keep_fp8_modules(model, names, block, False, dtype)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# ---------------------------------------------------------------------- which slice of each tensor a rank reads
# dsv3lab state-dict suffix -> the dimension split over the ranks (0: rows, column-parallel; 1: columns, row-parallel)
SPLIT_DIM = {
    "attn.wq.weight": 0,
    "attn.wq_b.weight": 0,
    "attn.wkv_b.weight": 0,
    "attn.wo.weight": 1,
    "ffn.w1.weight": 0,  # dense MLP
    "ffn.w3.weight": 0,
    "ffn.w2.weight": 1,
    "shared_experts.w1.weight": 0,
    "shared_experts.w3.weight": 0,
    "shared_experts.w2.weight": 1,
}


def split_dim(slot_name: str) -> int | None:
    """The dimension of a dsv3lab tensor that tensor parallelism splits (None: replicated or an expert stack)."""
    for suffix, dim in SPLIT_DIM.items():
        if slot_name.endswith("." + suffix):
            return dim
    return None


@dataclass
class ShardLoadStats(LoadStats):
    """:class:`LoadStats` of one rank, plus what it asked the files for: ``slices`` maps each tensor read to
    (dimension, start, stop) — dimension None for a whole (replicated) tensor — and ``experts`` lists the global
    routed-expert indices whose weights it read. ``bytes_read`` counts weight and scale bytes alike."""

    slices: dict[str, tuple[int | None, int, int]] = field(default_factory=dict)
    experts: set[int] = field(default_factory=set)


def _read(f, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
    """The rows (dim 0) or columns (dim 1) [start, stop) of a tensor, read through ``get_slice`` alone."""
    sl = f.get_slice(name)
    if dim is None:
        return sl[:]
    return sl[start:stop] if dim == 0 else sl[:, start:stop]


def _dequantize_slice(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dim: int | None, start: int
) -> torch.Tensor:
    """E4M3 rows/columns starting at ``start`` of a blockwise weight, times the scale blocks covering them (read
    from block start // b): fp32, equal bit for bit to ``dequantize_blocks`` of the whole weight, then sliced."""
    full = expand_scale(scale.float(), block, torch.Size((scale.shape[0] * block[0], scale.shape[1] * block[1])))
    r0 = start % block[0] if dim == 0 else 0
    c0 = start % block[1] if dim == 1 else 0
    return q.float() * full[r0 : r0 + q.shape[0], c0 : c0 + q.shape[1]]


def _scale_range(dim: int | None, start: int, stop: int, block: tuple[int, int]) -> tuple[int, int]:
    b = block[dim or 0]
    return start // b, -(-stop // b)


def load_sharded(
    path: str | os.PathLike,
    rank: int | None = None,
    world_size: int | None = None,
    *,
    group=None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    mtp: bool | None = None,
    keep_fp8: bool = False,
    quantize_activations: bool = False,
    stats: ShardLoadStats | None = None,
    **overrides: Any,
) -> DeepSeekV3:
    """This rank's part of an official-layout checkpoint (BF16/FP32 or block-FP8), as a model whose forward joins the
    other ranks' (tensor-parallel attention and dense FFNs, expert-parallel routed experts; see the module docstring).

    ``rank``/``world_size`` default to those of ``group`` (the default process group); the checks (config, names,
    header shapes, divisibility) run before the process group is needed, so a bad folder or world size is an error
    on every rank. The other arguments are :func:`dsv3lab.infer.from_pretrained`'s. ``stats`` receives a
    :class:`ShardLoadStats` (the slices read).
    """
    if quantize_activations and not keep_fp8:
        raise ValueError("quantize_activations=True computes with the kept FP8 weights: it needs keep_fp8=True")
    folder = Path(path)  # read only: no recover() of an interrupted save here, where every rank would race to it
    if not (folder / CONFIG_FILE).exists():
        raise CheckpointError(
            f"{folder} has no {CONFIG_FILE}: loading across processes needs the official Hugging Face layout "
            "(convert a dsv3lab folder or a training run with `dsv3lab convert SRC DST`)"
        )
    hf_cfg = read_hf_config(folder)
    block = fp8_block(hf_cfg)
    rope_interleave = bool(hf_cfg.get("rope_interleave", True))
    cfg = read_model_config(folder, hf_cfg, **overrides)
    weight_map = read_weight_map(folder)
    cfg, expected, duplicates = _plan(cfg, weight_map, mtp, folder)
    if rank is None or world_size is None:
        rank, world_size = _group_info(group)
    check_world(cfg, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if keep_fp8 and block is None:
        raise CheckpointError(
            f"keep_fp8=True needs an FP8 checkpoint (config.json with quantization_config.quant_method 'fp8'); "
            f"{folder} has none"
        )
    if dtype is None:
        stored = hf_cfg.get("torch_dtype", hf_cfg.get("dtype", "bfloat16"))
        dtype = torch.bfloat16 if block is not None else DTYPES.get(stored, torch.bfloat16)
    stats = stats if stats is not None else ShardLoadStats()
    check_headers(folder, cfg, weight_map, expected, duplicates, block)  # whole shapes, from the headers alone

    with torch.device("meta"):
        model = shard_model(DeepSeekV3(cfg), rank, world_size, group)  # local shapes, no memory
        model.to(dtype)
        if keep_fp8:
            keep_fp8_modules(model, [s.name for s in expected.values() if s.fp8], block, quantize_activations, dtype)
    model.to_empty(device=device or "cpu")
    targets = model.state_dict()
    local_cfg = cfg.replace(n_heads=cfg.n_heads // world_size)  # the per-head RoPE rows of a local q projection
    fp8_store = _fp8_store(targets, local_cfg, rope_interleave) if keep_fp8 else None
    n_local = cfg.n_routed_experts // world_size
    first = rank * n_local

    def local_slot(slot: Slot) -> Slot | None:
        """The slot in this rank's model (an expert's local index), or None for another rank's expert."""
        if slot.index is None:
            return slot
        if not first <= slot.index < first + n_local:
            return None
        return dataclasses.replace(slot, index=slot.index - first)

    def target(slot: Slot) -> torch.Tensor:
        name = stored_names(slot)[0] if keep_fp8 and slot.fp8 else slot.name
        return targets[name] if slot.index is None else targets[name][slot.index]

    filled: set[str] = set()
    dup_files: dict[str, str] = {}
    by_file = shard_groups(weight_map)
    with torch.no_grad():
        for file in by_file:
            with safe_open(folder / file, framework="pt", device="cpu") as f:
                used = False
                for name in by_file[file]:
                    if name.endswith(SCALE_SUFFIX) or name not in expected and name not in duplicates:
                        continue  # scales are read with their weight; skipped MTP tensors are not read
                    if name in duplicates:
                        dup_files[name] = file
                        continue
                    slot = local_slot(expected[name])
                    if slot is None:
                        filled.add(name)  # another rank's expert: not read here
                        continue
                    used = True
                    dst = target(slot)
                    dim = split_dim(slot.name)
                    start = 0 if dim is None else rank * dst.shape[dim]
                    stop = 0 if dim is None else start + dst.shape[dim]
                    t = stats.track(_read(f, name, dim, start, stop))
                    stats.slices[name] = (dim, start, stop)
                    if slot.index is not None:
                        stats.experts.add(slot.index + first)
                    stats.tensors += 1
                    stats.bytes_read += t.numel() * t.element_size()
                    scale_name = name + SCALE_SUFFIX
                    if is_fp8(t):
                        if scale_name not in weight_map:
                            raise CheckpointError(
                                f"{name} is stored in {t.dtype} but its scale {scale_name} is not in the checkpoint"
                            )
                        blk = block or DEFAULT_BLOCK
                        s0, s1 = _scale_range(dim, start, stop, blk)
                        if weight_map[scale_name] == file:  # as a rule the scale sits next to its weight
                            scale = stats.track(_read(f, scale_name, dim, s0, s1)).float()
                        else:
                            with safe_open(folder / weight_map[scale_name], framework="pt", device="cpu") as g:
                                scale = stats.track(_read(g, scale_name, dim, s0, s1)).float()
                        stats.bytes_read += scale.numel() * 4
                        if keep_fp8:
                            b = blk[dim or 0]
                            if dim is not None and (start % b or stop % b and stop != world_size * dst.shape[dim]):
                                raise CheckpointError(
                                    f"{name}: rank {rank} of {world_size} holds rows/columns [{start}, {stop}) "
                                    f"along dim {dim}, which do not start and end on the {blk} scale blocks, so "
                                    "the slice cannot stay in FP8; load with keep_fp8=False (dequantised) or use "
                                    "a world size whose slices are multiples of the block"
                                )
                            fp8_store(name, slot, t, scale, blk, model)
                            filled.add(name)
                            continue
                        t = stats.track(_dequantize_slice(t, scale, blk, dim, start))
                        del scale
                    else:
                        check_unquantized(name, t, scale_name in weight_map, keep_fp8 and slot.fp8)
                    check_values(name, t)
                    if slot.rope is not None and not rope_interleave:
                        t = stats.track(from_rotate_half(t, local_cfg if dim == 0 else cfg, slot.rope))
                    if tuple(t.shape) != tuple(dst.shape):
                        raise CheckpointError(
                            f"{name}: rank {rank} read shape {tuple(t.shape)} but its model needs {tuple(dst.shape)}"
                        )
                    dst.copy_(t)
                    filled.add(name)
                    del t
                if used:
                    stats.files.append(file)
        not_filled = [n for n in expected if n not in filled]
        if not_filled:
            raise CheckpointError(f"{folder}: tensors not loaded: {names_list(not_filled)}")
        for name, file in dup_files.items():  # the MTP copies of the replicated embedding and head
            _check_duplicate(folder, file, name, targets[duplicates[name]], weight_map)
    model.init_buffers()
    return model.eval()


# ---------------------------------------------------------------------- under torchrun
def launched_world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``), 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


def join_launched_group(device: str | None = None) -> tuple[int, int, str]:
    """Join the process group torchrun launched (NCCL when ``device`` is CUDA — one GPU per local rank —, gloo
    otherwise) unless one is already initialised; returns (rank, world_size, this rank's device)."""
    cuda = device is not None and str(device).startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return dist.get_rank(), dist.get_world_size(), device or "cpu"


def leave_launched_group() -> None:
    """Destroy the process group :func:`join_launched_group` joined (after the last collective)."""
    if dist.is_initialized():
        dist.destroy_process_group()
