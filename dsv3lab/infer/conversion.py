"""``dsv3lab convert SRC DST``: between dsv3lab's own checkpoints and the official layout, and FP8 <-> BF16.

Sources (detected from the folder's files):

* ``hf``       the official Hugging Face layout (``config.json`` + safetensors): converted *streaming*, one source
               shard at a time, never building the model — FP8 <-> BF16/FP32 (dequantise / quantise each projection),
               the RoPE layout (``rope_interleave``) and the dtype. Shard file names are kept (as the official
               ``fp8_cast_bf16.py`` does); the index and config.json are rewritten.
* ``dsv3lab``  dsv3lab's plain folder (``model.safetensors`` = ``model.state_dict()`` + ``dsv3lab_config.json``).
* ``run``      a training run folder of ``dsv3lab train`` (read with ``dsv3lab.train.load_run``), when available; a run
               trained on several processes (sharded checkpoint) goes to the official layout part by part with
               :func:`dsv3lab.infer.export.export_sharded`, by every rank when run under torchrun.

Targets: ``to="hf"`` (default) writes the official layout; ``to="dsv3lab"`` writes the plain folder.

Notebook: 10_inference.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..files import atomic_folder, check_replaceable, is_empty_folder, recover
from ..model import DeepSeekV3
from ..train import load_run
from .blockfp8 import DEFAULT_BLOCK, dequantize_blocks, is_fp8, quantize_blocks
from .checkpoint import (
    CONFIG_FILE,
    DTYPES,
    INDEX_FILE,
    NATIVE_CONFIG,
    SCALE_SUFFIX,
    CheckpointError,
    _plan,
    check_headers,
    check_values,
    dtype_name,
    fp8_block,
    fp8_quantization_config,
    from_pretrained,
    is_checkpoint_folder,
    load_state_dict_folder,
    read_hf_config,
    read_model_config,
    read_weight_map,
    save_pretrained,
    save_state_dict,
)
from .export import export_sharded, is_sharded_run
from .layout import from_rotate_half, to_rotate_half

EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


def detect(path: str | os.PathLike) -> str:
    """``hf``, ``dsv3lab`` or ``run`` for a checkpoint folder; an error naming what was looked for otherwise."""
    folder = Path(path)
    recover(folder)  # a save interrupted between its two renames left the old folder beside the path
    if not folder.is_dir():
        raise FileNotFoundError(f"{path} is not a folder")
    if (folder / CONFIG_FILE).exists():
        return "hf"
    if (folder / NATIVE_CONFIG).exists():
        return "dsv3lab"
    if _is_run(folder):
        return "run"
    raise FileNotFoundError(
        f"{path} is not a checkpoint: expected config.json (official layout), {NATIVE_CONFIG} "
        "(dsv3lab state_dict) or a dsv3lab training run"
    )


def _is_run(folder: Path) -> bool:
    return (folder / "run.json").exists()  # written by dsv3lab.train (the run's configs; checkpoints in ckpt-*/)


def load_any(
    path: str | os.PathLike,
    device=None,
    dtype: torch.dtype | None = None,
    *,
    keep_fp8: bool = False,
    quantize_activations: bool = False,
    **overrides: Any,
) -> DeepSeekV3:
    """Load a model from any checkpoint kind :func:`detect` recognises (``keep_fp8``, ``quantize_activations``: see
    :func:`from_pretrained`)."""
    kind = detect(path)
    if kind == "hf":
        return from_pretrained(
            path, device=device, dtype=dtype, keep_fp8=keep_fp8, quantize_activations=quantize_activations, **overrides
        )
    if keep_fp8:
        raise ValueError(
            f"keep_fp8 needs an FP8 checkpoint in the official layout; {path} is a {kind} folder "
            "(dsv3lab convert --fp8 writes one)"
        )
    if kind == "dsv3lab":
        return load_state_dict_folder(path, device=device, dtype=dtype, **overrides)
    model = load_run(path).model
    if overrides:
        raise ValueError("config overrides are not supported for training-run folders")
    return model.to(device=device or "cpu", dtype=dtype).eval() if dtype else model.to(device or "cpu").eval()


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str = "hf",
    fp8: bool | None = None,
    dtype: torch.dtype | None = None,
    rope_interleave: bool | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Convert a checkpoint. ``fp8``: True writes block-FP8 projections, False dequantises, None keeps the source's;
    ``dtype``: the other tensors' dtype (default: kept); ``rope_interleave``: the RoPE layout (default: kept, and
    interleaved for non-HF sources). Returns the written folder."""
    if to not in ("hf", "dsv3lab"):
        raise ValueError(f"to must be 'hf' or 'dsv3lab', got {to!r}")
    if dtype is not None and dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
    kind = detect(src)
    dst = Path(dst)
    if dst.exists() and not is_empty_folder(dst):  # checked before anything is read or written
        if not overwrite:
            raise FileExistsError(f"{dst} exists and is not empty; pass --overwrite to replace it")
        check_replaceable(dst, is_checkpoint_folder, src)
    if kind == "hf" and to == "hf":
        return _convert_hf_streaming(Path(src), Path(dst), fp8, dtype, rope_interleave, overwrite)
    if to == "dsv3lab" and (fp8 or rope_interleave is False):
        raise ValueError("dsv3lab's plain folder holds the model's own tensors: no FP8, interleaved RoPE")
    if kind == "run" and to == "hf" and is_sharded_run(src):  # part by part, by every rank of a torchrun job
        return export_sharded(
            src,
            dst,
            fp8=bool(fp8),
            dtype=dtype,
            rope_interleave=True if rope_interleave is None else rope_interleave,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
        )
    model = load_any(src, dtype=dtype)
    if to == "dsv3lab":
        return save_state_dict(model, dst, overwrite=overwrite)
    tokenizers = [p for p in (Path(src) / "tokenizer.json", Path(src) / "tokenizer" / "tokenizer.json") if p.exists()]
    return save_pretrained(
        model,
        dst,
        fp8=bool(fp8),
        dtype=dtype,
        max_shard_size=max_shard_size,
        rope_interleave=True if rope_interleave is None else rope_interleave,
        tokenizer=tokenizers[0] if tokenizers else None,
        overwrite=overwrite,
    )


def _convert_hf_streaming(
    src: Path, dst: Path, fp8: bool | None, dtype: torch.dtype | None, rope_interleave: bool | None, overwrite: bool
) -> Path:

    hf_cfg = read_hf_config(src)
    block_in = fp8_block(hf_cfg)
    src_interleave = bool(hf_cfg.get("rope_interleave", True))
    dst_interleave = src_interleave if rope_interleave is None else rope_interleave
    want_fp8 = block_in is not None if fp8 is None else fp8
    block_out = (block_in or DEFAULT_BLOCK) if want_fp8 else None
    cfg = read_model_config(src, hf_cfg)
    weight_map = read_weight_map(src)
    cfg, expected, duplicates = _plan(cfg, weight_map, mtp=None, path=src)
    check_headers(src, cfg, weight_map, expected, duplicates, block_in)  # as the loader: before writing anything
    stored = hf_cfg.get("torch_dtype", hf_cfg.get("dtype", "bfloat16"))
    base_dtype = dtype or (torch.bfloat16 if block_in is not None else DTYPES.get(stored, torch.bfloat16))

    with atomic_folder(dst, overwrite, replaceable=is_checkpoint_folder, src=src) as tmp:
        new_map: dict[str, str] = {}
        total = 0
        for file in sorted(set(weight_map.values())):
            out: dict[str, torch.Tensor] = {}
            with safe_open(src / file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name.endswith(SCALE_SUFFIX) or (name not in expected and name not in duplicates):
                        continue  # scales travel with their weight; skipped MTP tensors are dropped
                    t = f.get_tensor(name)
                    if is_fp8(t):
                        scale_name = name + SCALE_SUFFIX
                        if scale_name not in weight_map:
                            raise CheckpointError(
                                f"{name} is stored in {t.dtype} but its scale {scale_name} is missing"
                            )
                        with safe_open(src / weight_map[scale_name], framework="pt", device="cpu") as g:
                            scale = g.get_tensor(scale_name)
                        t = dequantize_blocks(t, scale, block_in or DEFAULT_BLOCK, dtype=torch.float32)
                    check_values(name, t)
                    slot = expected.get(name)
                    if slot is not None and slot.rope is not None and src_interleave != dst_interleave:
                        t = from_rotate_half(t, cfg, slot.rope) if dst_interleave else to_rotate_half(t, cfg, slot.rope)
                    if slot is not None and slot.fp8 and block_out is not None:
                        q, s = quantize_blocks(t, block_out)
                        out[name], out[name + SCALE_SUFFIX] = q, s
                    elif name.endswith("e_score_correction_bias"):
                        out[name] = t.float().contiguous()
                    else:
                        out[name] = t.to(base_dtype).contiguous()
            save_file(out, str(tmp / file), metadata={"format": "pt"})
            for name, t in out.items():
                new_map[name] = file
                total += t.numel() * t.element_size()
            del out
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        new_cfg = {k: v for k, v in hf_cfg.items() if k != "quantization_config"}
        new_cfg["torch_dtype"] = dtype_name(base_dtype)
        new_cfg.pop("dtype", None)
        new_cfg["rope_interleave"] = dst_interleave
        if block_out is not None:
            new_cfg["quantization_config"] = fp8_quantization_config(block_out)
        (tmp / CONFIG_FILE).write_text(json.dumps(new_cfg, indent=2) + "\n")
        for extra in EXTRA_FILES:
            if (src / extra).exists():
                shutil.copyfile(src / extra, tmp / extra)
    return dst
