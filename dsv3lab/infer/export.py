"""Export a sharded training checkpoint (``torch.distributed.checkpoint``, written by a run on several processes) to
the official Hugging Face layout — BF16, FP32 or block-FP8 — without ever holding the whole model in one process.

Every rank of the job (or one process, for all shards in turn) takes a contiguous part of the model's tensors,
balanced by bytes, in the official file order:

    rank r: its dsv3lab tensors read from the DCP shards (only those bytes)  ─►  official names, RoPE layout, FP8
            blocks (``infer.checkpoint.save_pretrained``'s conversion)  ─►  model-0000{r+1}-of-0000N.safetensors
    rank 0, after all have written: model.safetensors.index.json, config.json (and the tokenizer)

All files go into one hidden temporary folder that rank 0 publishes when complete (:mod:`dsv3lab.files`), like every
checkpoint dsv3lab writes; :func:`dsv3lab.infer.from_pretrained` loads the result. The largest piece a process holds
is its part: a stacked expert tensor [E, ...] of one layer is the smallest unit (a rank never splits it).

Notebook: 11_scale_to_full.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from ..config import ModelConfig
from ..files import atomic_folder, atomic_write_json, read_json
from ..train.checkpoint import STATE_FILE, is_sharded_checkpoint, latest_checkpoint
from ..utils import parse_size
from .blockfp8 import DEFAULT_BLOCK
from .checkpoint import CONFIG_FILE, DTYPES, INDEX_FILE, _hf_tensors, hf_config, is_checkpoint_folder, save_tokenizer
from .layout import layout, mtp_duplicates


class _Weights:
    """What :func:`dsv3lab.infer.checkpoint._hf_tensors` reads from a model: its config and (part of) its state."""

    def __init__(self, cfg: ModelConfig, tensors: dict[str, torch.Tensor]):
        self.cfg, self._tensors = cfg, tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._tensors


def sharded_checkpoint(src: str | os.PathLike) -> Path:
    """The sharded checkpoint of ``src``: a run folder (its latest checkpoint) or a checkpoint folder."""
    src = Path(src)
    ckpt = src if is_sharded_checkpoint(src) else latest_checkpoint(src)
    if ckpt is None or not is_sharded_checkpoint(ckpt):
        raise FileNotFoundError(
            f"{src} holds no sharded checkpoint (a run trained on several processes: ckpt-*/.metadata); a "
            "single-process run exports with dsv3lab convert"
        )
    return ckpt


def is_sharded_run(src: str | os.PathLike) -> bool:
    """Does ``src`` (a run folder or a checkpoint folder) hold a sharded checkpoint?"""
    try:
        sharded_checkpoint(src)
    except (FileNotFoundError, ValueError):
        return False
    return True


def split_parts(cfg: ModelConfig, sizes: dict[str, int], n: int) -> list[list[str]]:
    """The official names in file order cut into ``n`` contiguous parts of about equal bytes; the names that come from
    one dsv3lab tensor (the experts of a layer, the MTP copies of the embedding and head) stay in one part."""
    names = list(layout(cfg))
    dups = mtp_duplicates(cfg)
    source = {name: slot.name for name, slot in layout(cfg).items()}
    units: list[tuple[str, list[str]]] = []  # (dsv3lab tensor, its official names), first use order
    index: dict[str, int] = {}
    for name in names:
        src = source[name]
        if src not in index:
            index[src] = len(units)
            units.append((src, []))
        units[index[src]][1].append(name)
    for name, src in dups.items():
        units[index[src]][1].append(name)
    total = sum(sizes[src] for src, _ in units)
    parts: list[list[str]] = [[] for _ in range(n)]
    done = 0
    for src, hf_names in units:
        part = min(n - 1, int(done * n / max(total, 1)))  # the part the unit's first byte falls in
        parts[part] += hf_names
        done += sizes[src]
    return parts


def _read(ckpt: Path, names: list[str], meta) -> dict[str, torch.Tensor]:
    """The full tensors ``names`` (dsv3lab state-dict keys) from the checkpoint's shards, read by this process alone."""
    model = {}
    for name in names:
        md = meta.state_dict_metadata[f"model.{name}"]
        model[name] = torch.empty(md.size, dtype=md.properties.dtype)
    if model:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": model}, checkpoint_id=ckpt, no_dist=True)
    return model


def export_sharded(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    fp8: bool = False,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype | None = None,
    rope_interleave: bool = True,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write the official layout of the sharded checkpoint ``src`` (a run folder or ``ckpt-*``) to ``dst``.

    Called on every rank of an initialised process group, each writes one shard file of its part (a collective);
    without a process group one process writes parts of at most ``max_shard_size`` one after the other, holding one
    part at a time. ``tokenizer``: default the run folder's. ``fp8``
    stores the projections as E4M3 with a scale per ``block``; ``dtype`` is that of the other tensors (default: the
    checkpoint's; the router bias stays FP32, as in the released checkpoint). Under torchrun (``WORLD_SIZE`` set)
    without a process group, one is started (gloo) for the export and ended after it. Returns ``dst``."""
    if dtype is not None and dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
    ckpt = sharded_checkpoint(src)
    if tokenizer is None and (Path(src) / "tokenizer" / "tokenizer.json").is_file():
        tokenizer = Path(src) / "tokenizer"
    state = read_json(ckpt / STATE_FILE, "a checkpoint's state")
    cfg = ModelConfig.from_dict(state["model_config"])
    meta = dcp.FileSystemReader(str(ckpt)).read_metadata()
    dtype = dtype or meta.state_dict_metadata["model.embed.weight"].properties.dtype  # default: the run's own
    if any(k.endswith("_fp8") for k in meta.state_dict_metadata):
        raise ValueError(f"{ckpt} holds FP8-stored weights (_fp8); export them with dsv3lab convert in one process")
    sizes = {}
    for name, slot in layout(cfg).items():
        md = meta.state_dict_metadata.get(f"model.{slot.name}")
        if md is None:
            raise ValueError(f"{ckpt} has no tensor model.{slot.name} (needed for {name})")
        sizes[slot.name] = md.size.numel() * md.properties.dtype.itemsize
    created = not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if created:  # `torchrun ... -m dsv3lab convert RUN DST`: every rank writes its part
        dist.init_process_group("gloo")
    try:
        return _export(
            ckpt, Path(dst), cfg, meta, sizes, fp8, block, dtype, rope_interleave, tokenizer, max_shard_size, overwrite
        )
    finally:
        if created:
            dist.destroy_process_group()


def _export(ckpt, dst, cfg, meta, sizes, fp8, block, dtype, rope_interleave, tokenizer, max_shard_size, overwrite):
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    n_parts = world if distributed else max(1, math.ceil(sum(sizes.values()) / parse_size(max_shard_size)))
    parts = split_parts(cfg, sizes, n_parts)
    mine = [rank] if distributed else list(range(n_parts))
    source = {**{n: s.name for n, s in layout(cfg).items()}, **mtp_duplicates(cfg)}
    block_or_none = tuple(block) if fp8 else None

    box: list[Any] = [None]
    folder = None
    if rank == 0:
        folder = atomic_folder(Path(dst), overwrite, replaceable=is_checkpoint_folder)
        box = [str(folder.__enter__())]
    if distributed:
        dist.broadcast_object_list(box, src=0)
    tmp = Path(box[0])
    try:
        written: dict[str, str] = {}
        total = 0
        for p in mine:
            names = parts[p]
            if not names:
                continue
            tensors = _read(ckpt, sorted({source[n] for n in names}), meta)
            file = f"model-{p + 1:05d}-of-{n_parts:05d}.safetensors"
            out: dict[str, torch.Tensor] = {}
            for _, produce, _ in _hf_tensors(_Weights(cfg, tensors), block_or_none, rope_interleave, dtype, set(names)):
                for name, t in produce():
                    out[name] = t
                    written[name] = file
                    total += t.numel() * t.element_size()
            save_file(out, str(tmp / file), metadata={"format": "pt"})
            del tensors, out
        maps: list[Any] = [(written, total)]
        if distributed:
            maps = [None] * world
            dist.all_gather_object(maps, (written, total))
        if rank == 0:
            weight_map = {k: v for m, _ in maps for k, v in m.items()}
            index = {
                "metadata": {"total_size": sum(t for _, t in maps)},
                "weight_map": dict(sorted(weight_map.items())),
            }
            atomic_write_json(tmp / INDEX_FILE, index)
            atomic_write_json(tmp / CONFIG_FILE, hf_config(cfg, dtype, block_or_none, rope_interleave))
            if tokenizer is not None:
                save_tokenizer(tokenizer, tmp)
        if distributed:
            dist.barrier()
    except BaseException as err:
        if folder is not None:
            folder.__exit__(type(err), err, err.__traceback__)
        raise
    if folder is not None:
        folder.__exit__(None, None, None)  # publish
    if distributed:
        dist.barrier()
    return Path(dst)
