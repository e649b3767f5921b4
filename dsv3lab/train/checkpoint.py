"""Checkpoints: safetensors for tensors, JSON for everything else, written so that a crash never loses the last one.

A run folder holds ``run.json`` (what the run is: TrainConfig, ModelConfig, data settings) and checkpoint folders

    ckpt-0000200/  model.safetensors      every persistent tensor of the model (the selection biases included)
                   optimizer.safetensors  AdamW moments and step counts, keyed ``state.<param index>.<name>``
                   state.json             step, optimizer hyper-parameters, schedule values, RNG states, data
                                          position, configs
    latest         the name of the newest complete checkpoint folder

A run trained on several processes (:mod:`dsv3lab.train.distributed`) writes *sharded* checkpoints instead: the same
folder names and ``state.json`` (with ``"format": "torch.distributed.checkpoint"``), the tensors as
``torch.distributed.checkpoint`` shards (``.metadata`` and one ``__<rank>_0.distcp`` per rank), model under
``model.``, optimizer under ``optim.`` by parameter name (flattened: ``optim.state.<param>.exp_avg`` …).
:func:`load_sharded_checkpoint` reads them at any world size, one process without a process group included (the
single-process trainer resumes them and ``load_run`` reads them).

Atomicity (``dsv3lab.files``): a checkpoint is written into a hidden temporary folder, renamed to ``ckpt-NNNNNNN`` (a
directory rename is atomic), and only then is ``latest`` replaced (temp file + ``os.replace``). A crash at any moment
leaves ``latest`` naming a complete checkpoint; older checkpoints are removed only after the pointer has moved.
"""

from __future__ import annotations

import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from ..config import without_later_defaults
from ..files import atomic_folder, atomic_write_json, atomic_write_text, read_json, recover
from .config import config_differences

RUN_FILE = "run.json"  # a run folder's configs (and, for a stage, its parent)
LATEST = "latest"
PREFIX = "ckpt-"
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"
DCP_FORMAT = "torch.distributed.checkpoint"  # state.json "format" of a sharded checkpoint
DCP_METADATA = ".metadata"


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
    meta = dict(state, step=step, param_groups=opt["param_groups"], optimizer_scalars=opt_state, rng=rng_state())
    # re-saving the same step (a finished run resumed) replaces the folder only once the new one is complete
    with atomic_folder(run_dir / name, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / MODEL_FILE))
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        atomic_write_json(tmp / STATE_FILE, meta)
    atomic_write_text(run_dir / LATEST, name + "\n")
    ckpts = sorted(p for p in run_dir.glob(f"{PREFIX}*") if p.is_dir() and p.name != name)
    for p in ckpts[: max(0, len(ckpts) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return run_dir / name


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / LATEST
    if not pointer.exists():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    recover(path)  # a re-save interrupted between its two renames left the old folder beside the path
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def is_sharded_checkpoint(path: Path) -> bool:
    """A checkpoint folder of ``torch.distributed.checkpoint`` shards (written by a run on several processes)."""
    path = Path(path)
    return (path / DCP_METADATA).is_file() and (path / STATE_FILE).is_file()


StateHook = Callable[[dict[str, Any]], dict[str, Any]] | None


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, to_saved: StateHook = None) -> dict:
    """``{"model": ..., "optim": ...}``: the state dicts of ``torch.distributed.checkpoint.state_dict`` (FSDP2 shards
    as DTensors; the optimizer's flattened, ``state.<param name>.<key>`` and ``param_groups.<param name>.<key>``, so
    that ranks holding different parameters — pipeline stages — never collide), changed by ``to_saved`` (e.g.
    expert-parallel banks given their global shape)."""
    if optimizer is None:
        sd = {"model": get_model_state_dict(model)}
    else:
        model_sd, optim_sd = get_state_dict(
            model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True)
        )
        sd = {"model": model_sd, "optim": optim_sd}
    return to_saved(sd) if to_saved is not None else sd


def load_sharded_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    to_saved: StateHook = None,
    from_saved: StateHook = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Load a sharded checkpoint into ``model`` (and ``optimizer``) at this process's layout — any world size, one
    process included: DCP reads each tensor's slices by their global offsets. ``to_saved`` / ``from_saved`` map this
    layout's state dict to the saved one and back; ``strict=False`` when they leave out tensors this process does not
    load (a pipeline rank loads its own stage). Returns ``state.json``."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a sharded checkpoint ({DCP_METADATA} and {STATE_FILE} expected)")
    sd = sharded_state(model, optimizer, to_saved)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, checkpoint_id=path, no_dist=not (dist.is_available() and dist.is_initialized()))
    sd = from_saved(sd) if from_saved is not None else sd
    if optimizer is None:
        set_model_state_dict(model, sd["model"], options=StateDictOptions(strict=strict))
    else:
        options = StateDictOptions(strict=strict, flatten_optimizer_state_dict=True)
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=options)
    return read_json(path / STATE_FILE, "a checkpoint's state")


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(model tensors, optimizer tensors, state.json) of a checkpoint folder."""
    path = Path(path)
    for f in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE):
        if not (path / f).exists():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {f} is missing")
    state = read_json(path / STATE_FILE, "a checkpoint's state")
    return load_file(str(path / MODEL_FILE)), load_file(str(path / OPTIMIZER_FILE)), state


def model_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``field: saved -> current`` between two ``ModelConfig.to_dict()`` (``name`` and later fields at their
    defaults left out)."""
    saved, current = ({k: v for k, v in without_later_defaults(d).items() if k != "name"} for d in (saved, current))
    return config_differences(saved, current)


def check_config(state: dict[str, Any], train_identity: dict[str, Any], model_cfg: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint written by another configuration, naming every mismatched field."""
    diffs = [f"train.{d}" for d in config_differences(state.get("train_config", {}), train_identity)]
    diffs += [f"model.{d}" for d in model_differences(state.get("model_config", {}), model_cfg)]
    if diffs:
        raise ValueError(
            f"{where} was written by another configuration; mismatched fields (saved -> now): " + "; ".join(diffs)
        )


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
