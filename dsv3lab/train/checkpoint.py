"""Checkpoints: safetensors for tensors, JSON for everything else, written so that a crash never loses the last one.

A run folder holds ``run.json`` (what the run is: TrainConfig, ModelConfig, data settings) and checkpoint folders

    ckpt-0000200/  model.safetensors      every persistent tensor of the model (the selection biases included)
                   optimizer.safetensors  AdamW moments and step counts, keyed ``state.<param index>.<name>``
                   state.json             step, optimizer hyper-parameters, schedule values, RNG states, data
                                          position, configs
    latest         the name of the newest complete checkpoint folder

Atomicity: a checkpoint is written into a hidden temporary folder, renamed to ``ckpt-NNNNNNN`` (a directory rename is
atomic), and only then is ``latest`` replaced (temp file + ``os.replace``). A crash at any moment leaves ``latest``
naming a complete checkpoint; older checkpoints are removed only after the pointer has moved.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import config_differences

LATEST = "latest"
PREFIX = "ckpt-"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def rng_state() -> dict[str, Any]:
    state = {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state())}
    return state


def set_rng_state(state: dict[str, Any], torch_state: torch.Tensor | None) -> None:
    random.setstate(_tupled(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    if torch_state is not None:
        torch.set_rng_state(torch_state)


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 1,
) -> Path:
    """Write checkpoint ``step`` (completed optimizer steps) atomically and point ``latest`` at it."""
    run_dir = Path(run_dir)
    name = f"{PREFIX}{step:07d}"
    final = run_dir / name
    tmp = run_dir / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    opt = optimizer.state_dict()
    tensors, opt_state = {}, {}
    for idx, pstate in opt["state"].items():
        opt_state[str(idx)] = {}
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                opt_state[str(idx)][key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = dict(state, step=step, param_groups=opt["param_groups"], optimizer_scalars=opt_state, rng=rng_state())
    atomic_write_json(tmp / "state.json", meta)
    old = None
    if final.exists():  # re-saving the same step (e.g. a finished run resumed): swap, then delete the old one
        old = run_dir / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    atomic_write_text(run_dir / LATEST, name + "\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    ckpts = sorted(p for p in run_dir.glob(f"{PREFIX}*") if p.is_dir() and p.name != name)
    for p in ckpts[: max(0, len(ckpts) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / LATEST
    if not pointer.exists():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(model tensors, optimizer tensors, state.json) of a checkpoint folder."""
    path = Path(path)
    for f in ("model.safetensors", "optimizer.safetensors", "state.json"):
        if not (path / f).exists():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {f} is missing")
    state = json.loads((path / "state.json").read_text())
    return load_file(str(path / "model.safetensors")), load_file(str(path / "optimizer.safetensors")), state


def check_config(state: dict[str, Any], train_identity: dict[str, Any], model_cfg: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint written by another configuration, naming every mismatched field."""
    diffs = [f"train.{d}" for d in config_differences(state.get("train_config", {}), train_identity)]
    saved_model = {k: v for k, v in state.get("model_config", {}).items() if k != "name"}
    diffs += [
        f"model.{d}" for d in config_differences(saved_model, {k: v for k, v in model_cfg.items() if k != "name"})
    ]
    if diffs:
        raise ValueError(
            f"{where} was written by another configuration; mismatched fields (saved -> now): " + "; ".join(diffs)
        )


def load_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Strict load: a missing, unexpected or wrongly shaped tensor is one clear error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [
        f"{k}: {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in weights and weights[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:5]}")
        raise ValueError(f"{where} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(weights, strict=True)


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], state: dict[str, Any]
) -> None:
    opt_state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in state["optimizer_scalars"].items()}
    for key, value in tensors.items():
        if not key.startswith("state."):
            continue
        _, idx, name = key.split(".", 2)
        opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
