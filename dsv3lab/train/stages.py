"""Training in stages: a new run that starts from another run's checkpoint (DeepSeek-V3 §4.3 context extension,
§5 post-training).

DeepSeek-V3 is trained in stages: pre-training at 4K tokens, two YaRN stages to 32K and 128K (1000 steps each, new
sequence length, batch size and learning rate), then supervised fine-tuning and reinforcement learning. Each stage
continues the *weights* of the one before with new settings. dsv3lab models a stage as a new run folder:

    dsv3lab train --from runs/short --set seq_len=256 --set max_seq_len=256 --set rope_factor=4 --out runs/yarn

* ``init_from`` (``--from``) names the parent: a run folder (its latest checkpoint) or one ``ckpt-NNNNNNN`` folder.
  The new run loads the parent's weights (the selection biases included), starts a fresh optimizer and its own
  schedules at step 0, and writes everything into its own folder. ``run.json`` records the parent: the checkpoint
  folder, its step and a SHA-256 of its weights.
* Only settings that leave the weights meaningful may change (:data:`STAGE_CHANGEABLE`): the RoPE/YaRN fields, how
  the model computes (attention path, expert implementation, FP8), the balance-loss weights, and every TrainConfig
  field (data, sequence length, steps, learning rate, ...). Any other ModelConfig difference (``dim``, ``n_layers``,
  the experts, ``vocab_size``, ``n_mtp``, the router's ``score_func`` ...) is refused, naming every field.
* ``--resume`` keeps its meaning: continue *this* run, bit for bit, with an unchanged configuration. A stage run
  resumes like any run from its own checkpoints; before its first checkpoint it starts again from the parent, and
  refuses if the parent's weights changed meanwhile (their SHA-256 differs from the recorded one).

:func:`stage_config` builds a stage's TrainConfig from the parent run's own (what ``--from`` does on the command line):
the parent's settings, then the changes. Notebooks: 12_long_context, 13_post_training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, without_later_defaults
from .checkpoint import MODEL_FILE, RUN_FILE, STATE_FILE, latest_checkpoint, read_checkpoint
from .config import TrainConfig, config_differences

# ModelConfig fields a stage may change: they leave every weight's shape and meaning intact.
STAGE_CHANGEABLE = (
    # RoPE / YaRN (§4.3): how positions are encoded, not what the weights are
    "max_seq_len",
    "original_seq_len",
    "rope_theta",
    "rope_factor",
    "beta_fast",
    "beta_slow",
    "mscale",
    "rope_type",
    # how the same function is computed
    "attn_impl",
    "moe_impl",
    "fp8",
    "fp8_gemm",
    "fp8_scale_fmt",
    "max_batch_size",
    # training-loss weights (set by TrainConfig.balance) and things used only when building a fresh model
    "aux_loss_alpha",
    "seq_aux_loss_alpha",
    "mtp_lambda",
    "init_std",
    "name",
)


@dataclass
class Parent:
    """The checkpoint a stage starts from: where it is, what it holds, and the record kept in ``run.json``."""

    checkpoint: Path
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    digest: str  # SHA-256 of model.safetensors, 16 hex digits

    @property
    def model_config(self) -> dict[str, Any]:
        return self.state["model_config"]

    def record(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "step": self.state["step"],
            "model_digest": self.digest,
            "train_config": self.state.get("train_config", {}),
        }


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (holding ``state.json``) as given, or a run folder's latest checkpoint."""
    p = Path(path)
    if (p / STATE_FILE).exists():
        return p.resolve()
    if (p / RUN_FILE).exists():
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise FileNotFoundError(f"init_from: the run {p} has no checkpoint yet (no 'latest' pointer)")
        return ckpt.resolve()
    raise FileNotFoundError(
        f"init_from: {p} is neither a checkpoint folder (with {STATE_FILE}) nor a run folder (with {RUN_FILE})"
    )


def weights_digest(checkpoint: Path) -> str:
    """SHA-256 (16 hex digits) of a checkpoint's ``model.safetensors``: the identity of the weights a stage starts
    from."""
    h = hashlib.sha256()
    with open(Path(checkpoint) / MODEL_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def stage_differences(parent_model: dict[str, Any], model_cfg: ModelConfig) -> list[str]:
    """The ModelConfig changes a stage may not make (``field: parent -> now``), later fields at defaults aside."""
    saved = {k: v for k, v in without_later_defaults(parent_model).items() if k not in STAGE_CHANGEABLE}
    now = {k: v for k, v in without_later_defaults(model_cfg.to_dict()).items() if k not in STAGE_CHANGEABLE}
    return config_differences(saved, now)


def load_parent(init_from: str, model_cfg: ModelConfig) -> Parent:
    """Read the parent checkpoint of a stage and check that ``model_cfg`` can continue its weights."""
    ckpt = resolve_checkpoint(init_from)
    weights, _, state = read_checkpoint(ckpt)
    diffs = stage_differences(state.get("model_config", {}), model_cfg)
    if diffs:
        raise ValueError(
            f"cannot start a stage from {ckpt}: these model settings change the weights' shapes or meaning "
            f"(parent -> now): {'; '.join(diffs)}. A stage may change only {', '.join(STAGE_CHANGEABLE[:-1])} and "
            "any TrainConfig field"
        )
    return Parent(ckpt, weights, state, weights_digest(ckpt))


def check_same_parent(recorded: dict[str, Any] | None, parent: Parent, out: Path) -> None:
    """Before its first checkpoint a resumed stage restarts from its parent: refuse if those weights changed."""
    if recorded and recorded.get("model_digest") != parent.digest:
        raise ValueError(
            f"cannot resume {out}: its parent's weights changed since the stage started ({recorded.get('checkpoint')} "
            f"had SHA-256 {recorded.get('model_digest')}, {parent.checkpoint} has {parent.digest}); start the stage "
            "again with --overwrite"
        )


def parent_run_config(path: str | Path) -> TrainConfig:
    """The TrainConfig of the run that wrote a parent (a run folder, or a checkpoint folder inside one)."""
    ckpt = resolve_checkpoint(path)
    run_file = ckpt.parent / RUN_FILE
    saved = json.loads(run_file.read_text())["train_config"] if run_file.exists() else None
    if saved is None:  # a checkpoint folder moved out of its run: its state.json has the same identity
        saved = json.loads((ckpt / STATE_FILE).read_text())["train_config"]
    return TrainConfig.from_dict(saved)


def stage_config(parent: str | Path, overrides: list[str] | None = None, **changes: Any) -> TrainConfig:
    """A stage's TrainConfig: the parent run's settings, then ``changes`` (TrainConfig fields) and ``overrides``
    (``key=value`` strings of TrainConfig or ModelConfig fields, as ``--set``), with ``init_from=parent``.

    Example (the first YaRN stage at toy size)::

        stage_config("runs/short", ["seq_len=256", "max_seq_len=256", "rope_factor=4"], steps=40, out="runs/yarn")
    """
    base = parent_run_config(parent)
    cfg = base.replace(init_from=str(parent), **changes)
    return cfg.with_overrides(list(overrides or []))
