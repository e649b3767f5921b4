"""Checkpoint files in the official Hugging Face layout, both ways: ``from_pretrained`` and ``save_pretrained``.

A folder holds ``config.json`` (``DeepseekV3ForCausalLM``; ``quantization_config`` when the weights are FP8),
``model-0000k-of-0000n.safetensors`` shards and ``model.safetensors.index.json`` (or one ``model.safetensors``), and
optionally ``tokenizer.json``. Tensor names and the MTP/RoPE conventions are in :mod:`dsv3lab.infer.layout`; the FP8
block (de)quantiser is :mod:`dsv3lab.infer.blockfp8`.

Loading is strict and streaming:

1. ``config.json`` -> ``infer.hf.config_from_hf`` (YaRN from ``rope_scaling`` or ``rope_parameters``); unsupported
   architectures, settings or quantization methods are errors.
2. The index is checked against the tensors the config implies *before* anything is allocated: one error lists every
   missing and unexpected tensor (and every FP8 weight without its ``weight_scale_inv``).
3. The model is built on the meta device (no init), materialised with ``to_empty`` and filled shard by shard, one
   tensor at a time: FP8 weights are dequantised, rotate-half RoPE rows are permuted, stacked experts are filled
   slice by slice, and every shape is checked (tensor name and both shapes in the error). RoPE tables are recomputed
   with ``init_buffers()``. Peak memory is the model plus the tensor being converted (``LoadStats`` measures it).
4. The model is returned only when every tensor has been filled; any error discards it.

Saving writes into a temporary folder that replaces the target only when complete (``os.replace``).

Notebook: 10_inference.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..config import ModelConfig
from ..files import CheckpointError, atomic_folder, member, names_list, read_json, recover
from ..model import DeepSeekV3
from ..model.transformer import load_state_dict_strict
from ..utils import parse_size
from .blockfp8 import DEFAULT_BLOCK, dequantize_blocks, is_fp8, quantize_blocks, scale_shape
from .fp8weights import keep_fp8_modules
from .hf import config_from_hf, config_to_hf
from .layout import Slot, from_rotate_half, layout, mtp_duplicates, mtp_prefixes, to_rotate_half

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
NATIVE_CONFIG = "dsv3lab_config.json"  # dsv3lab's own folder: state_dict + ModelConfig
SCALE_SUFFIX = "_scale_inv"  # "<name>.weight" -> "<name>.weight_scale_inv"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_checkpoint_folder(path: str | os.PathLike) -> bool:
    """A checkpoint folder --overwrite may replace: the official layout (config.json and an index or a single
    model.safetensors) or dsv3lab's own (dsv3lab_config.json and model.safetensors)."""
    p = Path(path)
    official = (p / CONFIG_FILE).is_file() and ((p / INDEX_FILE).is_file() or (p / SINGLE_FILE).is_file())
    return official or ((p / NATIVE_CONFIG).is_file() and (p / SINGLE_FILE).is_file())


# ---------------------------------------------------------------------- reading the folder
def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / CONFIG_FILE
    if not file.exists():
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}: not a checkpoint in the Hugging Face layout")
    try:
        return read_json(file, "a Hugging Face config.json object")
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def read_model_config(folder: Path, hf_cfg: dict[str, Any], **overrides: Any) -> ModelConfig:
    """The ModelConfig of a checkpoint's config.json; any problem is one ``CheckpointError`` naming the file."""
    try:
        return config_from_hf(hf_cfg, **overrides)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {err}") from None


def read_weight_map(path: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> shard file name, from the index (or the single ``model.safetensors``)."""
    folder = Path(path)
    if (folder / INDEX_FILE).exists():
        try:
            index = read_json(folder / INDEX_FILE, "a safetensors index")
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{folder / INDEX_FILE} has no 'weight_map' of tensor name -> shard file name")
    elif (folder / SINGLE_FILE).exists():
        try:
            with safe_open(folder / SINGLE_FILE, framework="pt") as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"{folder / SINGLE_FILE} is not a readable safetensors file ({err})") from None
    else:
        raise FileNotFoundError(f"{folder} has neither {INDEX_FILE} nor {SINGLE_FILE}")
    for shard in set(weight_map.values()):  # a shard named ../x, /abs/x or a symlink out is refused, never read
        member(folder, shard, what=f"shard named by {INDEX_FILE}")
    missing_files = sorted({f for f in weight_map.values() if not (folder / f).exists()})
    if missing_files:
        raise CheckpointError(f"the index of {folder} names shard files that do not exist: {names_list(missing_files)}")
    return weight_map


def fp8_block(hf_cfg: dict[str, Any]) -> tuple[int, int] | None:
    """The FP8 weight block from ``quantization_config`` (None when the checkpoint is not quantised)."""
    q = hf_cfg.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise CheckpointError(
            f"quantization_config.quant_method={method!r} is not supported; allowed: 'fp8' "
            "(block-wise E4M3 with weight_scale_inv, as the released DeepSeek-V3 weights)"
        )
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointError(f"quantization_config.fmt={fmt!r} is not supported; allowed: 'e4m3'")
    block = q.get("weight_block_size") or list(DEFAULT_BLOCK)
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise CheckpointError(f"quantization_config.weight_block_size must be two positive ints, got {block!r}")
    return (block[0], block[1])


def fp8_quantization_config(block: tuple[int, int]) -> dict[str, Any]:
    """The ``quantization_config`` of a block-FP8 checkpoint, as in the released DeepSeek-V3 ``config.json``."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block)}


def hf_config(
    cfg: ModelConfig, dtype: torch.dtype, fp8: tuple[int, int] | None = None, rope_interleave: bool = True
) -> dict[str, Any]:
    """The ``config.json`` dict written by :func:`save_pretrained`."""
    out = config_to_hf(cfg)
    out["rope_interleave"] = rope_interleave
    out["torch_dtype"] = dtype_name(dtype)
    if fp8 is not None:
        out["quantization_config"] = fp8_quantization_config(fp8)
    return out


# ---------------------------------------------------------------------- loading
@dataclass
class LoadStats:
    """What a load did: shard files in the order read, tensors read, and the peak bytes of checkpoint tensors
    (read, dequantised or permuted) alive at the same time — traced with weak references, so it measures what the
    loader actually holds, not what it intends to."""

    files: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes_read: int = 0
    shard_bytes: dict[str, int] = field(default_factory=dict)
    peak_live_bytes: int = 0
    live_bytes: int = 0

    def track(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        self.live_bytes += n
        self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
        weakref.finalize(t, self._release, n)
        return t

    def _release(self, n: int) -> None:
        self.live_bytes -= n


def _plan(cfg: ModelConfig, weight_map: dict[str, str], mtp: bool | None, path) -> tuple[ModelConfig, dict, dict]:
    """Decide whether MTP is loaded, then check the checkpoint's names against the config: one error for all."""
    prefixes = mtp_prefixes(cfg)
    has_mtp = any(n.startswith(p) for n in weight_map for p in prefixes)
    if mtp is None:
        mtp = has_mtp
        if cfg.n_mtp and not has_mtp:
            warnings.warn(
                f"{path}: config.json declares num_nextn_predict_layers={cfg.n_mtp} but the checkpoint holds "
                "no MTP weights (transformers does not save them); loading the main model with n_mtp=0",
                stacklevel=3,
            )
    elif mtp and cfg.n_mtp == 0:
        raise CheckpointError(f"mtp=True but {path}/config.json declares no MTP module (num_nextn_predict_layers=0)")
    skipped = []
    if not mtp:
        skipped = [n for n in weight_map if any(n.startswith(p) for p in prefixes)]
        cfg = cfg.replace(n_mtp=0)
    expected = layout(cfg)
    duplicates = mtp_duplicates(cfg)
    names = set(weight_map) - set(skipped)
    scales = {n for n in names if n.endswith(SCALE_SUFFIX)}
    missing = [n for n in expected if n not in names]
    unexpected = sorted(n for n in names - scales if n not in expected and n not in duplicates)
    unexpected += sorted(s for s in scales if s[: -len(SCALE_SUFFIX)] not in expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {names_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {names_list(unexpected)}")
        raise CheckpointError(f"{path} does not match its config.json ({cfg.summary()}): " + "; ".join(parts))
    return cfg, expected, duplicates


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")  # safetensors' names


def check_headers(
    folder: Path,
    cfg: ModelConfig,
    weight_map: dict[str, str],
    expected: dict[str, Slot],
    duplicates: dict[str, str],
    block: tuple[int, int] | None,
) -> None:
    """Before anything is allocated, from the safetensors headers alone: every tensor the index names is in its
    shard, floating-point, with the shape the model of ``cfg`` needs (scales: one per ``block``). One
    ``CheckpointError`` lists the problems, so a config.json whose sizes do not match the tensors (a vocab_size of
    1e9, say) is refused before a byte of the model exists. ``from_pretrained`` and ``convert`` both call it."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in DeepSeekV3(cfg).state_dict().items()}  # free: shapes only

    def want(name: str) -> tuple[int, ...] | None:
        if name in duplicates:
            return shapes[duplicates[name]]
        if name.endswith(SCALE_SUFFIX):
            w = want(name[: -len(SCALE_SUFFIX)])
            return None if w is None else scale_shape(w, block or DEFAULT_BLOCK)
        slot = expected.get(name)
        if slot is None:
            return None  # an MTP tensor that is not loaded
        return shapes[slot.name] if slot.index is None else shapes[slot.name][1:]

    problems: list[str] = []
    for file, names in shard_groups(weight_map).items():
        try:
            with safe_open(folder / file, framework="pt", device="cpu") as f:
                present = set(f.keys())
                for name in names:
                    shape = want(name)
                    if shape is None:
                        continue
                    if name not in present:
                        problems.append(f"{name} is listed in the index for {file} but is not in that file")
                        continue
                    header = f.get_slice(name)
                    if header.get_dtype() not in FLOAT_DTYPES:
                        problems.append(f"{name} is {header.get_dtype()}, not a floating-point tensor")
                    if tuple(header.get_shape()) != tuple(shape):
                        problems.append(
                            f"{name}: the checkpoint holds shape {tuple(header.get_shape())} but the model of "
                            f"config.json needs {tuple(shape)}"
                        )
        except (OSError, RuntimeError, ValueError, SafetensorError) as err:  # a truncated or corrupt file
            raise CheckpointError(f"{folder / file} is not a readable safetensors file ({err})") from None
    if problems:
        raise CheckpointError(
            f"{folder} does not match its config.json ({cfg.summary()}): {len(problems)} problem(s): "
            + names_list(problems, limit=8)
        )


def check_unquantized(name: str, t: torch.Tensor, has_scale: bool, needs_fp8: bool) -> None:
    """A tensor stored in a non-FP8 dtype: refuse it when the index also lists a block scale for it, or when the
    caller keeps the checkpoint in FP8 (``keep_fp8``) and this is one of the projections that must be FP8."""
    if has_scale:
        raise CheckpointError(f"{name} has a scale {name}{SCALE_SUFFIX} but is stored in {t.dtype}, not FP8")
    if needs_fp8:
        raise CheckpointError(
            f"{name} is stored in {t.dtype}, not FP8: keep_fp8=True needs every attention/FFN projection in FP8; "
            "load with keep_fp8=False"
        )


def shard_groups(weight_map: dict[str, str]) -> dict[str, list[str]]:
    """The index's ``weight_map`` (tensor -> shard file) grouped by file, files in sorted order, each file's tensors
    in index order: a loader opens every shard once."""
    groups: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        groups.setdefault(file, []).append(name)
    return dict(sorted(groups.items()))


def check_values(name: str, t: torch.Tensor) -> None:
    """A checkpoint tensor must hold finite values: NaN or ±inf is refused, naming the tensor."""
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{name} holds {bad} NaN or infinite value(s); refused (the file may be corrupt)")


# A hook for keeping FP8 weights in FP8 (e.g. dsv3lab.fp8 Linear layers): called for every FP8 tensor with
# (hf_name, slot, fp8_weight, scale_inv, block, model); return True when it has stored the weight itself.
FP8Hook = Callable[[str, Slot, torch.Tensor, torch.Tensor, tuple[int, int], DeepSeekV3], bool]


def stored_names(slot: Slot) -> list[str]:
    """The state-dict names that hold an FP8 slot kept in FP8: its E4M3 bits and its block scales."""
    return [slot.name + "_fp8", slot.name + "_scale_inv"]


def _fp8_store(targets: dict[str, torch.Tensor], cfg: ModelConfig, rope_interleave: bool) -> FP8Hook:
    """The FP8 hook of ``keep_fp8``: copies an E4M3 weight and its scales into the model's FP8 buffers as they are."""

    def store(name, slot, t, scale, block, model) -> bool:
        check_values(name + SCALE_SUFFIX, scale)
        if ((t.view(torch.uint8) & 0x7F) == 0x7F).any():  # E4M3's only NaN pattern: S.1111.111
            raise CheckpointError(f"{name} holds E4M3 NaN values; refused (the file may be corrupt)")
        q, s = (targets[n] for n in stored_names(slot))
        if slot.index is not None:
            q, s = q[slot.index], s[slot.index]
        if tuple(t.shape) != tuple(q.shape) or tuple(scale.shape) != tuple(s.shape):
            raise CheckpointError(
                f"{name}: the checkpoint holds shape {tuple(t.shape)} with scales "
                f"{tuple(scale.shape)} but the model of config.json needs {tuple(q.shape)} with "
                f"{tuple(s.shape)}"
            )
        bits = t.view(torch.uint8)
        if slot.rope is not None and not rope_interleave:
            src = from_rotate_half(torch.arange(t.shape[0])[:, None], cfg, slot.rope)[:, 0]  # row r comes from src[r]
            if not torch.equal(src // block[0], torch.arange(t.shape[0]) // block[0]):
                raise CheckpointError(
                    f"{name}: the rotate-half RoPE rows cross {block} scale blocks, so the weight "
                    "cannot stay in FP8; load it with keep_fp8=False"
                )
            bits = from_rotate_half(bits, cfg, slot.rope)
        q.copy_(bits)
        s.copy_(scale.float().view(torch.int32))
        return True

    return store


def _old_fp8_gemm(fp8_gemm: str | None, quantize_activations: bool) -> bool:
    """``fp8_gemm="dequant"|"fp8"`` was this switch's name before ``fp8_gemm`` meant only the FP8 backend."""
    if fp8_gemm is None:
        return quantize_activations
    if fp8_gemm not in ("dequant", "fp8"):
        raise ValueError(
            f"fp8_gemm must be 'dequant' or 'fp8' (deprecated; use quantize_activations), got {fp8_gemm!r}"
        )
    warnings.warn(
        f"from_pretrained(fp8_gemm={fp8_gemm!r}) is deprecated: use quantize_activations={fp8_gemm == 'fp8'}",
        DeprecationWarning,
        stacklevel=3,
    )
    return fp8_gemm == "fp8"


def from_pretrained(
    path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    mtp: bool | None = None,
    keep_fp8: bool = False,
    quantize_activations: bool = False,
    fp8_gemm: str | None = None,
    fp8_hook: FP8Hook | None = None,
    stats: LoadStats | None = None,
    **overrides: Any,
) -> DeepSeekV3:
    """Load a checkpoint in the official Hugging Face layout (BF16/FP32 or block-FP8) into a new ``DeepSeekV3``.

    ``dtype`` defaults to the checkpoint's ``torch_dtype`` (BF16 for FP8 checkpoints, which are dequantised);
    ``mtp``: None loads the MTP modules when the checkpoint has them, False skips them, True requires them;
    ``keep_fp8`` keeps an FP8 checkpoint's projections in E4M3 with their block scales (no dequantisation; see
    :mod:`dsv3lab.infer.fp8weights`), computing either with the weight dequantised just before each GEMM (default)
    or, with ``quantize_activations``, with FP8 activations too in the block-scaled GEMM (``fp8_gemm="dequant"|"fp8"``
    is the deprecated spelling of that switch); ``fp8_hook`` is the lower-level
    seam for storing FP8 weights yourself (see :data:`FP8Hook`); ``stats`` receives a :class:`LoadStats`;
    ``overrides`` are ModelConfig fields (e.g. ``attn_impl="absorb"``, ``moe_impl="grouped"``, ``max_seq_len``).
    A folder written by :func:`save_state_dict` (``dsv3lab_config.json``) is loaded with :func:`load_state_dict_folder`.
    """
    quantize_activations = _old_fp8_gemm(fp8_gemm, quantize_activations)
    if quantize_activations and not keep_fp8:
        raise ValueError("quantize_activations=True computes with the kept FP8 weights: it needs keep_fp8=True")
    folder = Path(path)
    recover(folder)  # a save interrupted between its two renames left the old folder beside the path
    if (folder / NATIVE_CONFIG).exists() and not (folder / CONFIG_FILE).exists():
        return load_state_dict_folder(folder, device=device, dtype=dtype, **overrides)
    hf_cfg = read_hf_config(folder)
    block = fp8_block(hf_cfg)
    rope_interleave = bool(hf_cfg.get("rope_interleave", True))
    cfg = read_model_config(folder, hf_cfg, **overrides)
    weight_map = read_weight_map(folder)
    cfg, expected, duplicates = _plan(cfg, weight_map, mtp, folder)
    if dtype is None:
        stored = hf_cfg.get("torch_dtype", hf_cfg.get("dtype", "bfloat16"))
        dtype = torch.bfloat16 if block is not None else DTYPES.get(stored, torch.bfloat16)
    stats = stats if stats is not None else LoadStats()

    if keep_fp8 and block is None:
        raise CheckpointError(
            f"keep_fp8=True needs an FP8 checkpoint (config.json with quantization_config."
            f"quant_method 'fp8'); {folder} has none"
        )
    if keep_fp8 and fp8_hook is not None:
        raise ValueError("pass keep_fp8=True or an fp8_hook, not both")
    check_headers(folder, cfg, weight_map, expected, duplicates, block)
    with torch.device("meta"):
        model = DeepSeekV3(cfg)  # shapes only: no memory, no init
        model.to(dtype)  # the router bias and RoPE tables stay fp32
        if keep_fp8:
            keep_fp8_modules(model, [sl.name for sl in expected.values() if sl.fp8], block, quantize_activations, dtype)
    model.to_empty(device=device or "cpu")
    targets = model.state_dict()  # tensors sharing storage with the parameters and persistent buffers
    names = {n for sl in expected.values() for n in (stored_names(sl) if keep_fp8 and sl.fp8 else [sl.name])}
    if set(targets) != names:  # the layout must cover the model exactly
        raise AssertionError(f"layout/model mismatch: {sorted(set(targets) ^ names)}")
    if keep_fp8:
        fp8_hook = _fp8_store(targets, cfg, rope_interleave)

    filled: set[str] = set()
    dup_files: dict[str, str] = {}
    by_file = shard_groups(weight_map)
    with torch.no_grad():
        for file in by_file:
            stats.files.append(file)
            stats.shard_bytes[file] = (folder / file).stat().st_size
            with safe_open(folder / file, framework="pt", device="cpu") as f:
                present = set(f.keys())
                for name in by_file[file]:
                    if name.endswith(SCALE_SUFFIX) or name not in expected and name not in duplicates:
                        continue  # scales are read with their weight; skipped MTP tensors are not read
                    if name not in present:
                        raise CheckpointError(f"{name} is listed in the index for {file} but is not in that file")
                    if name in duplicates:
                        dup_files[name] = file  # compared with the shared tensor once everything is loaded
                        continue
                    slot = expected[name]
                    t = stats.track(f.get_tensor(name))
                    stats.tensors += 1
                    stats.bytes_read += t.numel() * t.element_size()
                    scale_name = name + SCALE_SUFFIX
                    if is_fp8(t):
                        if scale_name not in weight_map:
                            raise CheckpointError(
                                f"{name} is stored in {t.dtype} but its scale {scale_name} is not in the checkpoint"
                            )
                        scale = stats.track(_read_tensor(f, folder, file, weight_map[scale_name], scale_name))
                        if fp8_hook is not None and fp8_hook(name, slot, t, scale, block or DEFAULT_BLOCK, model):
                            filled.add(name)
                            continue
                        try:
                            t = stats.track(dequantize_blocks(t, scale, block or DEFAULT_BLOCK, dtype=torch.float32))
                        except ValueError as err:
                            raise CheckpointError(f"{name}: {err}") from None
                        del scale
                    else:
                        check_unquantized(name, t, scale_name in weight_map, keep_fp8 and slot.fp8)
                    check_values(name, t)
                    if slot.rope is not None and not rope_interleave:
                        t = stats.track(from_rotate_half(t, cfg, slot.rope))
                    dst = targets[slot.name] if slot.index is None else targets[slot.name][slot.index]
                    if tuple(t.shape) != tuple(dst.shape):
                        raise CheckpointError(
                            f"{name}: the checkpoint holds shape {tuple(t.shape)} but the model of "
                            f"config.json needs {tuple(dst.shape)} (for {slot.name}"
                            f"{'' if slot.index is None else f'[{slot.index}]'})"
                        )
                    dst.copy_(t)
                    filled.add(name)
                    del t
        not_filled = [n for n in expected if n not in filled]
        if not_filled:  # cannot happen after _plan unless the index lies; never return a half-loaded model
            raise CheckpointError(f"{folder}: tensors not loaded: {names_list(not_filled)}")
        for name, file in dup_files.items():
            _check_duplicate(folder, file, name, targets[duplicates[name]], weight_map)
    model.init_buffers()  # RoPE tables (non-persistent), expert counters
    return model.eval()


def _read_tensor(f, folder: Path, file: str, other_file: str, name: str) -> torch.Tensor:
    """A tensor from the open shard ``f``, or (scales may sit in another shard, as fp8_cast_bf16 allows) from its
    own file."""
    if f is not None and other_file == file:
        return f.get_tensor(name)
    with safe_open(folder / other_file, framework="pt", device="cpu") as g:
        return g.get_tensor(name)


def _check_duplicate(folder: Path, file: str, name: str, shared: torch.Tensor, weight_map: dict[str, str]) -> None:
    with safe_open(folder / file, framework="pt", device="cpu") as f:
        t = f.get_tensor(name)
    if is_fp8(t):
        scale = _read_tensor(None, folder, file, weight_map[name + SCALE_SUFFIX], name + SCALE_SUFFIX)
        t = dequantize_blocks(t, scale, dtype=torch.float32)
    if tuple(t.shape) != tuple(shared.shape) or not torch.equal(t.to(shared.dtype), shared):
        raise CheckpointError(
            f"{name} differs from the shared tensor it should duplicate; dsv3lab shares one "
            "embedding and one output head between the main model and MTP (§2.2). Load with "
            "mtp=False to drop the MTP module(s)"
        )


# ---------------------------------------------------------------------- saving
def _hf_tensors(
    model: DeepSeekV3,
    fp8: tuple[int, int] | None,
    rope_interleave: bool,
    dtype: torch.dtype,
    names: set[str] | None = None,
) -> Iterator[tuple[str, Callable[[], list[tuple[str, torch.Tensor]]], int]]:
    """(HF name, a function producing the tensor(s) to write under it and its scale, bytes) in layout order; only the
    HF ``names`` when given (a rank's part of a sharded export, whose ``model.state_dict()`` holds just those)."""
    cfg = model.cfg
    sd = model.state_dict()
    entries = list(layout(cfg).items())
    dups = mtp_duplicates(cfg)
    for k in range(cfg.n_mtp):  # the released file puts the copies with the MTP layer; write them next to it
        prefix = f"model.layers.{cfg.n_layers + k}."
        entries += [(n, Slot(src)) for n, src in dups.items() if n.startswith(prefix)]

    for name, slot in entries:
        if names is not None and name not in names:
            continue
        kept = None  # (scales, block) of a weight loaded with keep_fp8, whose src holds E4M3 bits
        if slot.name + "_fp8" in sd:
            src, scale = (sd[n] if slot.index is None else sd[n][slot.index] for n in stored_names(slot))
            kept = (scale, model.get_submodule(slot.name.rsplit(".", 1)[0]).block)
        else:
            src = sd[slot.name] if slot.index is None else sd[slot.name][slot.index]
        keep_fp32 = slot.name.endswith("gate.bias")  # the correction bias stays fp32, as in the released file
        out_dtype = dtype if kept is not None or not keep_fp32 else src.dtype
        quant = fp8 is not None and slot.fp8

        def produce(src=src, slot=slot, name=name, out_dtype=out_dtype, quant=quant, kept=kept):
            if kept is not None:
                q, s = src.to("cpu").view(torch.float8_e4m3fn), kept[0].to("cpu").view(torch.float32)
                if quant and tuple(fp8) == kept[1] and (slot.rope is None or rope_interleave):
                    return [(name, q.clone()), (name + SCALE_SUFFIX, s.clone())]  # the stored bits, as they are
                t = dequantize_blocks(q, s, kept[1], dtype=torch.float32)
            else:
                t = src.detach().to("cpu")
            if slot.rope is not None and not rope_interleave:
                t = to_rotate_half(t, cfg, slot.rope)
            if quant:
                q, s = quantize_blocks(t, fp8)
                return [(name, q), (name + SCALE_SUFFIX, s)]
            return [(name, t.to(out_dtype).contiguous().clone())]  # clone: views of stacked experts share storage

        if quant:
            rows, cols = src.shape
            nbytes = rows * cols + 4 * (-(-rows // fp8[0])) * (-(-cols // fp8[1]))
        else:
            nbytes = src.numel() * out_dtype.itemsize
        yield name, produce, nbytes


def save_pretrained(
    model: DeepSeekV3,
    path: str | os.PathLike,
    *,
    fp8: bool = False,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype | None = None,
    rope_interleave: bool = True,
    max_shard_size: int | str = "5GB",
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` in the official layout: config.json, sharded safetensors and the index (atomically).

    ``fp8`` stores every attention/FFN projection as E4M3 with a ``weight_scale_inv`` per ``block`` (and writes
    ``quantization_config``); ``dtype`` casts the other tensors (default: the model's; the router bias stays fp32);
    ``rope_interleave=False`` writes the rotate-half RoPE layout; ``tokenizer`` (a ``tokenizers.Tokenizer``, a
    tokenizer.json path or a folder holding one) is copied alongside. Returns the folder.
    """
    path = Path(path)
    dtype = dtype or model.embed.weight.dtype
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
    limit = parse_size(max_shard_size)
    items = list(_hf_tensors(model, tuple(block) if fp8 else None, rope_interleave, dtype))
    shards: list[list[tuple[str, Callable, int]]] = [[]]
    size = 0
    for item in items:  # plan shards from sizes alone, so each shard is produced only when written
        if shards[-1] and size + item[2] > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[2]
    with atomic_folder(path, overwrite, replaceable=is_checkpoint_folder) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        n = len(shards)
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tensors = {}
            for _, produce, _ in shard:
                for name, t in produce():
                    tensors[name] = t
                    weight_map[name] = file
                    total += t.numel() * t.element_size()
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        cfg_json = hf_config(model.cfg, dtype, tuple(block) if fp8 else None, rope_interleave)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg_json, indent=2) + "\n")
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
    return path


def save_tokenizer(tokenizer: Any, folder: str | os.PathLike) -> None:
    """Copy a tokenizer into a checkpoint folder as ``tokenizer.json`` (from a ``tokenizers.Tokenizer``, a
    ``dsv3lab.data.Tokenizer`` wrapping one in ``.hf``, a tokenizer.json path, or a folder holding one)."""
    dst = Path(folder) / "tokenizer.json"
    inner = getattr(tokenizer, "hf", tokenizer)
    if hasattr(inner, "to_str"):  # tokenizers.Tokenizer
        dst.write_text(inner.to_str())
        return
    src = Path(tokenizer)
    if src.is_dir():
        src = src / "tokenizer.json"
    if not src.exists():
        raise FileNotFoundError(f"no tokenizer.json at {src}")
    shutil.copyfile(src, dst)
    extra = src.parent / "tokenizer_config.json"
    if extra.exists():
        shutil.copyfile(extra, Path(folder) / "tokenizer_config.json")


# ---------------------------------------------------------------------- dsv3lab's own folder: state_dict + config


def save_state_dict(model: DeepSeekV3, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """dsv3lab's plain format: ``model.safetensors`` (``model.state_dict()``) and ``dsv3lab_config.json``."""
    path = Path(path)
    with atomic_folder(path, overwrite, replaceable=is_checkpoint_folder) as tmp:
        sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        (tmp / NATIVE_CONFIG).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    return path


def load_state_dict_folder(
    path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> DeepSeekV3:
    """Load a folder written by :func:`save_state_dict` (strict: missing, unexpected and mis-shaped tensors are one
    error)."""
    folder = Path(path)
    cfg = ModelConfig.from_dict(read_json(folder / NATIVE_CONFIG, "a dsv3lab model config"))
    if overrides:
        cfg = cfg.replace(**overrides)
    sd = load_file(folder / SINGLE_FILE)
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    if dtype is not None:
        model.to(dtype)
    else:
        model.to(sd["embed.weight"].dtype)
    model.to_empty(device=device or "cpu")
    load_state_dict_strict(model, sd, str(folder))
    model.init_buffers()
    return model.eval()
